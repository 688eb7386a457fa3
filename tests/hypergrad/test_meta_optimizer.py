"""MetaOptimizer (AuxiLearn API) against dense closed forms, finite differences and the engine.

Problem: auxiliary-loss weighting for linear regression on scikit-learn's diabetes data.
Three tasks share the weights ``w``: the main target, a related target (main + noise) and a
harmful one (the main target permuted). ``L_T(w, φ) = Σ_j φ_j ½‖X w − y_j‖²/n + μ‖w‖²/2`` is
quadratic in ``w``, so ``H``, ``∂g/∂φ`` and ``w*(φ)`` have closed forms.
"""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_diabetes
from torch import nn

from bilevel import hypergrad
from bilevel.errors import HypergradError, NeumannDivergenceError
from bilevel.hypergrad import MetaOptimizer

MU = 0.5


@pytest.fixture
def prob():
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    g = torch.Generator().manual_seed(0)
    xt, yt, xv, yv = x[:300], y[:300], x[300:], y[300:]
    targets = torch.stack([yt, yt + 0.5 * torch.randn(300, generator=g, dtype=torch.float64),
                           yt[torch.randperm(300, generator=g)]])  # [3, n]
    return {"xt": xt, "ys": targets, "xv": xv, "yv": yv}


def train_loss(p, w, phi):
    r = p["xt"] @ w - p["ys"]  # [3, n]
    return (phi * 0.5 * (r * r).mean(1)).sum() + 0.5 * MU * (w * w).sum()


def val_loss(p, w):
    r = p["xv"] @ w - p["yv"]
    return 0.5 * (r * r).mean()


def dense(p, w, phi):
    """H, ∂g/∂φ (columns), v = ∂L_V/∂w at w, all dense."""
    n = p["xt"].shape[0]
    h = phi.sum() * p["xt"].T @ p["xt"] / n + MU * torch.eye(10, dtype=w.dtype)
    dg_dphi = torch.stack([p["xt"].T @ (p["xt"] @ w - y) / n for y in p["ys"]], 1)  # [10, 3]
    v = p["xv"].T @ (p["xv"] @ w - p["yv"]) / p["xv"].shape[0]
    return h, dg_dphi, v


def w_star(p, phi):
    n = p["xt"].shape[0]
    h = phi.sum() * p["xt"].T @ p["xt"] / n + MU * torch.eye(10, dtype=phi.dtype)
    return torch.linalg.solve(h, p["xt"].T @ (p["ys"].T @ phi) / n)


def meta_grad(p, w, phi, **kw):
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), max_grad_norm=None, **kw)
    grads = meta.step(train_loss=train_loss(p, w, phi), val_loss=val_loss(p, w),
                      parameters=[w], aux_params=[phi], return_grads=True)
    return grads[0], meta


def leaves(p, phi_value=(1.0, 0.5, 0.3), at_star=True):
    phi = torch.tensor(phi_value, dtype=torch.float64, requires_grad=True)
    w0 = w_star(p, phi.detach()) if at_star else torch.linspace(-1, 1, 10, dtype=torch.float64)
    return w0.clone().requires_grad_(), phi


@pytest.mark.parametrize("k", [0, 1, 3, 10])
@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_seed_series_unscaled_and_signed(prob, k, alpha):
    """g = −(∂g/∂φ)ᵀ Σ_{j≤K} (I − αH)^j v, with no final ×α, away from the optimum too."""
    w, phi = leaves(prob, at_star=False)
    h, dg, v = dense(prob, w.detach(), phi.detach())
    m = torch.eye(10, dtype=torch.float64) - alpha * h
    p_sum = sum(torch.linalg.matrix_power(m, j) @ v for j in range(k + 1))
    got, _ = meta_grad(prob, w, phi, hpo_lr=alpha, truncate_iter=k)
    torch.testing.assert_close(got, -dg.T @ p_sum)
    scaled, _ = meta_grad(prob, *leaves(prob, at_star=False), hpo_lr=alpha, truncate_iter=k,
                          neumann_scale="alpha")
    torch.testing.assert_close(scaled, -alpha * dg.T @ p_sum)


def test_alpha_scaled_converges_to_exact_implicit_and_finite_differences(prob):
    w, phi = leaves(prob)
    h, dg, v = dense(prob, w.detach(), phi.detach())
    exact = -dg.T @ torch.linalg.solve(h, v)
    got, _ = meta_grad(prob, w, phi, hpo_lr=0.25, truncate_iter=400, neumann_scale="alpha")
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-10)
    unscaled, _ = meta_grad(prob, *leaves(prob), hpo_lr=0.25, truncate_iter=400)
    torch.testing.assert_close(unscaled, exact / 0.25, rtol=1e-7, atol=1e-10)
    cg, _ = meta_grad(prob, *leaves(prob), hpo_lr=0.25, truncate_iter=30, solver="cg",
                      neumann_scale="alpha")
    torch.testing.assert_close(cg, exact, rtol=1e-7, atol=1e-10)
    eps, phi0 = 1e-6, phi.detach()
    fd = torch.stack([
        (val_loss(prob, w_star(prob, phi0 + eps * e)) - val_loss(prob, w_star(prob, phi0 - eps * e)))
        / (2 * eps) for e in torch.eye(3, dtype=torch.float64)])
    torch.testing.assert_close(exact, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")  # K=4 on purpose
def test_matches_engine_unrolled_and_implicit(prob):
    """α × the seed's K-term sum = unrolling K+1 steps of w − α∇L_T from the fixed point.

    α = 0.1 keeps α·λ_max(H) below 2 (the series converges, slowly: K = 4 warns); at α = 0.3
    the terms grow and the engine refuses, where the seed's formula sums them silently."""
    alpha, k = 0.1, 4
    w, phi = leaves(prob)
    got, _ = meta_grad(prob, w, phi, hpo_lr=alpha, truncate_iter=k)

    def step(s, hp, t):
        ws = s["w"].detach().requires_grad_() if not s["w"].requires_grad else s["w"]
        g = torch.autograd.grad(train_loss(prob, ws, hp["phi"]), ws, create_graph=True)[0]
        return {"w": s["w"] - alpha * g}

    hp = {"phi": phi.detach().clone().requires_grad_()}
    state = {"w": w.detach()}
    unrolled = hypergrad.unrolled(step, lambda s, h: val_loss(prob, s["w"]), state, hp,
                                  steps=k + 1)
    torch.testing.assert_close(alpha * got, unrolled.hypergrad["phi"])
    implicit = hypergrad.implicit(step, lambda s, h: val_loss(prob, s["w"]), state, hp,
                                  solver="neumann", terms=k + 1)
    torch.testing.assert_close(alpha * got, implicit.hypergrad["phi"])

    def step_03(s, hp, t):  # w − 0.3∇L_T
        return {"w": s["w"] + 3.0 * (step(s, hp, t)["w"] - s["w"])}

    with pytest.raises(NeumannDivergenceError, match="larger than the term before it"):
        hypergrad.implicit(step_03,
                           lambda s, h: val_loss(prob, s["w"]), state, hp, solver="neumann", terms=k + 1)


def test_meta_step_descends_the_validation_loss(prob):
    """Sign check: a small SGD step along .grad lowers L_V(w*(φ))."""
    w, phi = leaves(prob)
    before = val_loss(prob, w_star(prob, phi.detach()))
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=1e-3), hpo_lr=0.25, truncate_iter=50,
                         neumann_scale="alpha", max_grad_norm=None)
    meta.step(train_loss=train_loss(prob, w, phi), val_loss=val_loss(prob, w),
              parameters=[w], aux_params=[phi])
    assert val_loss(prob, w_star(prob, phi.detach())) < before
    assert float(phi.grad[2]) > 0  # the permuted-target task is pushed down


def test_clipping_and_returned_grads(prob):
    w, phi = leaves(prob, at_star=False)
    raw, _ = meta_grad(prob, w, phi, hpo_lr=0.3)
    w, phi = leaves(prob, at_star=False)
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=1.0), hpo_lr=0.3,
                         max_grad_norm=0.5 * float(raw.norm()))
    before = phi.detach().clone()
    grads = meta.step(train_loss=train_loss(prob, w, phi), val_loss=val_loss(prob, w),
                      parameters=[w], aux_params=[phi], return_grads=True)
    # clip_grad_norm_ divides by (norm + 1e-6): hence rtol 1e-5.
    torch.testing.assert_close(grads[0], 0.5 * raw, rtol=1e-5, atol=0)  # clipped in place
    torch.testing.assert_close(phi.detach(), before - grads[0])
    assert meta.last_info["clipped"] and meta.last_info["grad_norm"] == pytest.approx(float(raw.norm()))
    assert meta.step(train_loss=train_loss(prob, w, phi), val_loss=val_loss(prob, w),
                     parameters=[w], aux_params=[phi]) is None


def tiny_net():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(10, 6), nn.Tanh()).double()
    main, aux_head = nn.Linear(6, 1).double(), nn.Linear(6, 1).double()
    return trunk, main, aux_head


def net_losses(prob, trunk, main, aux_head, phi, unused_phi=None):
    z = trunk(prob["xt"])
    ell = torch.stack([((main(z).squeeze(1) - prob["ys"][0]) ** 2).mean(),
                       ((aux_head(z).squeeze(1) - prob["ys"][1]) ** 2).mean()])
    lt = ell[0] + torch.nn.functional.softplus(phi) @ ell[1:].repeat(2)[:2]
    lv = ((main(trunk(prob["xv"])).squeeze(1) - prob["yv"]) ** 2).mean()
    return lt, lv


def test_generators_and_unused_tensors(prob):
    """Generators are read once; an aux head (not in L_V) and an aux parameter that is not in
    L_T contribute zero instead of crashing (seed issue #6)."""
    trunk, main, aux_head = tiny_net()
    phi = torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)
    stray = torch.ones(3, dtype=torch.float64, requires_grad=True)  # reaches no loss
    all_params = lambda: (*trunk.parameters(), *main.parameters(), *aux_head.parameters())  # noqa: E731
    results = []
    for as_generator in (False, True):
        meta = MetaOptimizer(torch.optim.SGD([phi, stray], lr=0.0), hpo_lr=0.1)
        lt, lv = net_losses(prob, trunk, main, aux_head, phi)
        params = (x for x in all_params()) if as_generator else list(all_params())
        aux = (x for x in (phi, stray)) if as_generator else [phi, stray]
        results.append(meta.step(train_loss=lt, val_loss=lv, parameters=params,
                                 aux_params=aux, return_grads=True))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(results[0][0]) > 0
    assert torch.equal(results[0][1], torch.zeros(3, dtype=torch.float64))
    # The same value as excluding the aux head by hand (the seed's workaround).
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=0.1)
    lt, lv = net_losses(prob, trunk, main, aux_head, phi)
    excluded = meta.step(train_loss=lt, val_loss=lv, return_grads=True, aux_params=[phi],
                         parameters=[*trunk.parameters(), *main.parameters()])
    # Excluding the head (the seed's workaround) drops the head's curvature, which enters
    # (I − αH)^j through the trunk–head cross terms; keeping it is the full IFT over all
    # trained weights (checked against a dense Hessian below).
    assert not torch.allclose(excluded[0], results[0][0])


def test_nonlinear_net_against_dense_hessian(prob):
    """On a small tanh network, the K-term sum equals the dense-matrix formula."""
    trunk, main, aux_head = tiny_net()
    modules = [trunk, main, aux_head]
    names = [(m, k) for m in modules for k, _ in m.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])
    phi0 = torch.tensor([0.3, 0.1], dtype=torch.float64)

    def split(flat):
        out, i = [], 0
        for m in modules:
            d = {}
            for k, p in m.named_parameters():
                d[k] = flat[i:i + p.numel()].view_as(p)
                i += p.numel()
            out.append(d)
        return out

    def losses(flat, phi):
        ps = split(flat)
        f = torch.func.functional_call
        z = f(trunk, ps[0], (prob["xt"],))
        e0 = ((f(main, ps[1], (z,)).squeeze(1) - prob["ys"][0]) ** 2).mean()
        e1 = ((f(aux_head, ps[2], (z,)).squeeze(1) - prob["ys"][1]) ** 2).mean()
        lt = e0 + torch.nn.functional.softplus(phi) @ torch.stack([e1, e1 * e1])
        zv = f(trunk, ps[0], (prob["xv"],))
        return lt, ((f(main, ps[1], (zv,)).squeeze(1) - prob["yv"]) ** 2).mean()

    h = torch.autograd.functional.hessian(lambda x: losses(x, phi0)[0], flat0)
    gw = lambda x, ph: torch.autograd.grad(losses(x, ph)[0], x, create_graph=True)[0]  # noqa: E731
    cross = torch.autograd.functional.jacobian(lambda ph: gw(flat0.clone().requires_grad_(), ph), phi0)
    v = torch.func.grad(lambda x: losses(x, phi0)[1])(flat0)
    alpha, k = 0.05, 3
    m = torch.eye(len(flat0), dtype=torch.float64) - alpha * h
    expected = -cross.T @ sum(torch.linalg.matrix_power(m, j) @ v for j in range(k + 1))

    flat = flat0.clone().requires_grad_()
    phi = phi0.clone().requires_grad_()
    lt, lv = losses(flat, phi)
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=alpha, truncate_iter=k,
                         max_grad_norm=None)
    got = meta.step(train_loss=lt, val_loss=lv, parameters=[flat], aux_params=[phi],
                    return_grads=True)
    torch.testing.assert_close(got[0], expected)
    assert names  # parameters were split in named order


def test_direct_term_when_val_depends_on_phi(prob):
    w, phi = leaves(prob)
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=0.25, truncate_iter=400,
                         neumann_scale="alpha", max_grad_norm=None)
    got = meta.step(train_loss=train_loss(prob, w, phi),
                    val_loss=val_loss(prob, w) + (phi ** 2).sum(), parameters=[w],
                    aux_params=[phi], return_grads=True)[0]
    h, dg, v = dense(prob, w.detach(), phi.detach())
    torch.testing.assert_close(got, 2 * phi.detach() - dg.T @ torch.linalg.solve(h, v))


def test_state_dict_round_trip(prob):
    def make():
        phi = torch.tensor([1.0, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
        return phi, MetaOptimizer(torch.optim.Adam([phi], lr=0.01), hpo_lr=0.2,
                                  truncate_iter=2, max_grad_norm=3.0)

    def do_step(phi, meta):
        w = w_star(prob, phi.detach()).requires_grad_()
        meta.step(train_loss=train_loss(prob, w, phi), val_loss=val_loss(prob, w),
                  parameters=[w], aux_params=[phi])

    phi_a, meta_a = make()
    for _ in range(3):
        do_step(phi_a, meta_a)
    state = meta_a.state_dict()
    phi_b = phi_a.detach().clone().requires_grad_()
    meta_b = MetaOptimizer(torch.optim.Adam([phi_b], lr=0.5), hpo_lr=9.0, truncate_iter=7)
    meta_b.load_state_dict(state)
    assert meta_b.settings() == meta_a.settings()
    for _ in range(2):
        do_step(phi_a, meta_a)
        do_step(phi_b, meta_b)
    # Bit-identical in memory too (torch.optim alone would share Adam's step counter).
    assert torch.equal(phi_a, phi_b)
    with pytest.raises(KeyError, match="settings"):
        meta_b.load_state_dict({"meta_optimizer": state["meta_optimizer"]})


def test_errors(prob):
    phi = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([phi], lr=0.1)
    for kw, match in [({"hpo_lr": 0.0}, "hpo_lr"), ({"hpo_lr": 1, "truncate_iter": -1}, "truncate_iter"),
                      ({"hpo_lr": 1, "max_grad_norm": 0}, "max_grad_norm"),
                      ({"hpo_lr": 1, "neumann_scale": "lorraine"}, "neumann_scale")]:
        with pytest.raises(ValueError, match=match):
            MetaOptimizer(opt, **kw)
    with pytest.raises(TypeError, match="meta_optimizer"):
        MetaOptimizer([phi], hpo_lr=0.1)
    meta = MetaOptimizer(opt, hpo_lr=0.1)
    w = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    gen = (x for x in [w])
    list(gen)
    with pytest.raises(ValueError, match="exhausted generator"):
        meta.step(train_loss=train_loss(prob, w, phi), val_loss=val_loss(prob, w),
                  parameters=gen, aux_params=[phi])
    with pytest.raises(HypergradError, match="val_loss"):
        meta.step(train_loss=train_loss(prob, w, phi), val_loss=val_loss(prob, w).detach(),
                  parameters=[w], aux_params=[phi])


def test_divergence_raises_or_falls_back(prob):
    w, phi = leaves(prob, at_star=False)
    with pytest.raises(NeumannDivergenceError, match="diverges"):
        meta_grad(prob, w, phi, hpo_lr=50.0, truncate_iter=10)
    w, phi = leaves(prob, at_star=False)
    got, meta = meta_grad(prob, w, phi, hpo_lr=50.0, truncate_iter=10, on_divergence="identity")
    _, dg, v = dense(prob, w.detach(), phi.detach())
    torch.testing.assert_close(got, -dg.T @ v)
    assert meta.last_info["fallback"] == "identity"
