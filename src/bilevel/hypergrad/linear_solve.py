"""Linear solvers for the implicit function theorem, on lists of tensors.

All solve ``(I - Jᵀ) x = b`` where ``Jᵀ v`` is given as a function ``jt(v)`` (one
vector-Jacobian product of the step map). For a gradient step ``Φ(w) = w - α∇L(w)``,
``I - Jᵀ = αH``, so these give ``x ≈ (αH)⁻¹ b``.

* :func:`neumann`: ``x = α Σ_{j=0..K} (I - α(I - Jᵀ))^j b``. With ``α = 1`` this is
  ``Σ_j (Jᵀ)^j b``: Lorraine et al.'s series (their α is the inner learning rate, already
  inside Φ) and Clarke et al.'s series (Φ = w − u). ``K = 0`` is the identity
  approximation ``x = α b``. Costs K products.
* :func:`cg`: conjugate gradients; assumes ``I - Jᵀ`` symmetric positive definite (true for
  a gradient step at a minimum, where it equals αH). It raises when it meets a direction of
  non-positive curvature unless ``on_indefinite="continue"`` (what other libraries do
  silently; the answer is then unreliable).
* :func:`minres`: MINRES (Paige & Saunders 1975); correct for symmetric *indefinite*
  systems (a saddle point of the inner loss), minimises the residual over the Krylov space.
* :func:`exact`: forms the dense matrix (n products) and solves it; small problems only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bilevel.errors import HypergradError, NeumannDivergenceError

Vec = list[torch.Tensor]
MatVec = Callable[[Vec], Vec]


def _norm(v: Vec) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in v])))


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def neumann(
    jt: MatVec, b: Vec, *, iters: int, alpha: float = 1.0, growth_limit: float = 1e3,
    detect_growth: bool = False,
) -> tuple[Vec, dict]:
    """Truncated Neumann series; raises :class:`NeumannDivergenceError` when a term grows
    past ``growth_limit`` times the norm of ``b`` (or stops being finite), and, with
    ``detect_growth``, as soon as a term is larger than both the one before it and the
    first: the terms of a convergent series shrink, so growth from one term to the next
    beyond the start means the map is not a contraction along ``b`` and the sum is
    dominated by what it should have discarded, long before the 1000x limit."""
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    b_norm = _norm(b)
    term, total, norms = list(b), list(b), [b_norm]
    for j in range(iters):
        jv = jt(term)
        term = [t + alpha * (y - t) for t, y in zip(term, jv, strict=True)] if alpha != 1.0 else jv
        total = [s + t for s, t in zip(total, term, strict=True)]
        norms.append(_norm(term))
        if not norms[-1] <= growth_limit * max(b_norm, 1e-30):
            raise NeumannDivergenceError(
                f"the Neumann series diverges: term {j + 1} has norm {norms[-1]:.3g}, "
                f"{norms[-1] / max(b_norm, 1e-30):.3g}x the first (alpha={alpha}). The step "
                "map is not a contraction here (learning rate too large for the curvature, "
                "or negative curvature). Use a smaller alpha, fewer iters, or "
                "solver='identity'."
            )
        if detect_growth and norms[-1] > norms[-2] and norms[-1] > norms[0]:
            raise NeumannDivergenceError(
                f"the Neumann series diverges: term {j + 1} has norm {norms[-1]:.3g}, larger "
                f"than the term before it ({norms[-2]:.3g}) and than the first "
                f"({norms[0]:.3g}) (alpha={alpha}). The terms of a convergent series shrink; "
                "alpha times the largest curvature is too large (or the curvature is "
                "negative). Use a smaller alpha (below 2 / (lr * largest eigenvalue of the "
                "Hessian)), solver='cg' at a minimum, or solver='minres' at a saddle."
            )
    return [alpha * s for s in total], {"term_norms": norms}


def _system(jt: MatVec) -> MatVec:
    def a(v: Vec) -> Vec:
        return [x - y for x, y in zip(v, jt(v), strict=True)]
    return a


def cg(
    jt: MatVec, b: Vec, *, iters: int, tol: float = 1e-10, on_indefinite: str = "raise"
) -> tuple[Vec, dict]:
    """Conjugate gradients on ``(I - Jᵀ) x = b``, at most ``iters`` products.

    ``on_indefinite``: ``"raise"`` (default) a :class:`HypergradError` at the first
    direction with ``pᵀAp <= 0``, or ``"continue"`` with the negative step (as other
    libraries do), reported in ``info["indefinite"]``; it stops if ``pᵀAp`` is exactly 0.
    """
    if on_indefinite not in ("raise", "continue"):
        raise ValueError(f"on_indefinite must be 'raise' or 'continue', got {on_indefinite!r}")
    a = _system(jt)
    x = [torch.zeros_like(t) for t in b]
    r, p = list(b), list(b)
    rr = _dot(r, r)
    b_norm = max(_norm(b), 1e-30)
    k, indefinite = 0, False
    for k in range(1, iters + 1):  # noqa: B007 (k is reported below)
        ap = a(p)
        pap = _dot(p, ap)
        if pap <= 0:
            if on_indefinite == "raise" or pap == 0:
                raise HypergradError(
                    "cg: the system (I - dΦ/ds)ᵀ is not positive definite here (pᵀAp = "
                    f"{float(pap):.3g}); CG needs a minimum of the inner loss. Use "
                    "solver='minres' (symmetric indefinite, e.g. a saddle point) or "
                    "'exact', or on_indefinite='continue' to carry on regardless."
                )
            indefinite = True
        step = rr / pap
        x = [xi + step * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - step * api for ri, api in zip(r, ap, strict=True)]
        rr_new = _dot(r, r)
        if float(rr_new.sqrt()) <= tol * b_norm:
            rr = rr_new
            break
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    info: dict = {"iterations": k, "residual": float(rr.sqrt()) / b_norm}
    return x, info | ({"indefinite": True} if indefinite else {})


def minres(jt: MatVec, b: Vec, *, iters: int, tol: float = 1e-10) -> tuple[Vec, dict]:
    """MINRES on ``(I - Jᵀ) x = b`` for a symmetric, possibly indefinite, ``I - Jᵀ``.

    The Lanczos process builds an orthonormal Krylov basis ``v_k`` and Givens rotations keep
    the least-squares problem ``min ‖b - A x‖`` over it solved as it grows (Paige & Saunders
    1975, without preconditioner); at most ``iters`` products, stopping when the residual
    norm falls below ``tol·‖b‖``. ``info["residual"]`` is ``‖b - A x‖ / ‖b‖``.
    """
    a = _system(jt)
    beta1 = _norm(b)
    x = [torch.zeros_like(t) for t in b]
    if beta1 == 0.0:
        return x, {"iterations": 0, "residual": 0.0}
    r1, r2, y = list(b), list(b), list(b)
    w = [torch.zeros_like(t) for t in b]
    w2 = [torch.zeros_like(t) for t in b]
    oldb, beta, dbar, epsln, phibar, cs, sn = 0.0, beta1, 0.0, 0.0, beta1, -1.0, 0.0
    k = 0
    for k in range(1, iters + 1):
        v = [t / beta for t in y]
        y = a(v)
        if k >= 2:
            y = [yi - (beta / oldb) * ri for yi, ri in zip(y, r1, strict=True)]
        alfa = float(_dot(v, y))
        y = [yi - (alfa / beta) * ri for yi, ri in zip(y, r2, strict=True)]
        r1, r2 = r2, y
        oldb, beta = beta, _norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa  # apply the previous rotation
        gbar = sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = max(math.hypot(gbar, beta), 1e-300)  # the next rotation
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = [(vi - oldeps * a1 - delta * a2) / gamma for vi, a1, a2 in zip(v, w1, w2, strict=True)]
        x = [xi + phi * wi for xi, wi in zip(x, w, strict=True)]
        if phibar <= tol * beta1 or beta == 0.0:
            break
    return x, {"iterations": k, "residual": phibar / beta1}


def exact(jt_batched: Callable[[torch.Tensor], Vec], b: Vec, *, max_dim: int) -> tuple[Vec, dict]:
    """Dense solve. ``jt_batched(E)`` maps an (m, n) batch of flat vectors to Jᵀ rows."""
    n = sum(t.numel() for t in b)
    if n > max_dim:
        raise HypergradError(
            f"solver='exact' forms an {n}x{n} matrix (limit max_dim={max_dim}); use "
            "solver='cg' or 'neumann' for a problem this size, or raise max_dim."
        )
    flat_b = torch.cat([t.reshape(-1) for t in b])
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
    rows = jt_batched(eye)  # per leaf, (n, *shape): entry i is Jᵀ e_i, i.e. row i of J
    jt_mat = torch.cat([r.reshape(n, -1) for r in rows], dim=1).T  # J stacked, transposed
    x = torch.linalg.solve(eye - jt_mat, flat_b)
    out, i = [], 0
    for t in b:
        out.append(x[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out, {"dim": n}
