"""Auxiliary-loss combiners: shapes, formulas, monotonicity, clamping, seed names, errors."""

from __future__ import annotations

import pytest
import torch

from bilevel.hypergrad import MetaOptimizer
from bilevel.meta import auxiliary as aux
from bilevel.meta.auxiliary import ConvCombiner, LinearCombiner, NonlinearCombiner, task_weights


def losses(b=6, t=4, seed=0):
    return torch.rand(b, t, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weight_norm", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_linear_formula(weight_norm, skip):
    comb = LinearCombiner(4, main_task=2, skip_connection=skip, init_value=0.5,
                          weight_norm=weight_norm)
    ell = losses()
    expected = 0.5 * ell.sum(1).mean() + (ell[:, 2].mean() if skip else 0.0)
    torch.testing.assert_close(comb(ell), expected)
    torch.testing.assert_close(comb.weights, torch.full((4,), 0.5))
    want = torch.full((4,), 0.5) + torch.tensor([0, 0, 1.0, 0]) * skip
    torch.testing.assert_close(task_weights(comb, ell), want)


def test_nonlinear_structure_and_skip():
    comb = NonlinearCombiner(4, hidden_sizes=(5, 3), main_task=1, init_range=(0.0, 1.0))
    linears = [m for m in comb.net if isinstance(m, torch.nn.Linear)]
    assert [lin.weight.shape for lin in linears] == [(5, 4), (3, 5), (1, 3)]
    assert linears[-1].bias is None and all(lin.bias is not None for lin in linears[:-1])
    assert any(isinstance(m, torch.nn.Softplus) for m in comb.net)
    assert all(float(lin.weight.detach().min()) >= 0 for lin in linears)
    ell = losses()
    torch.testing.assert_close(comb(ell), comb.net(ell).mean() + ell[:, 1].mean())


def _break_monotonicity(comb):
    """Make the first layer's effective weights negative, the others positive (for weight
    norm: g > 0, v < 0 in the first layer)."""
    with torch.no_grad():
        first = None
        for name, p in comb.named_parameters():
            if name.endswith("bias"):
                continue
            layer = name.split(".parametrizations")[0].rsplit(".weight", 1)[0]
            first = first or layer
            negative = layer == first and not name.endswith("original0")
            p.copy_(-p.abs() - 0.1 if negative else p.abs() + 0.1)


@pytest.mark.parametrize("make", [
    lambda: LinearCombiner(4, monotone=True, skip_connection=True),
    lambda: LinearCombiner(4, monotone=True, weight_norm=False),
    lambda: NonlinearCombiner(4, hidden_sizes=(3,), monotone=True),
    lambda: NonlinearCombiner(4, hidden_sizes=(6, 2), monotone=True, weight_norm=False),
])
def test_clamp_restores_monotonicity(make):
    comb = make()
    _break_monotonicity(comb)
    ell = losses(b=32, seed=1)
    assert float(task_weights(comb, ell).min()) < 0  # broken: some loss is rewarded
    comb.clamp()
    assert all(float(p.detach().min()) >= 0 for n, p in comb.named_parameters() if "bias" not in n)
    # Monotone: raising any single loss never lowers the output.
    for j in range(4):
        bumped = ell.clone()
        bumped[:, j] += 0.5
        with torch.no_grad():
            assert float(comb(bumped)) >= float(comb(ell)) - 1e-7
    assert float(task_weights(comb, ell).min()) >= 0


def test_clamp_is_a_no_op_when_not_monotone():
    comb = NonlinearCombiner(3)
    _break_monotonicity(comb)
    before = [p.detach().clone() for p in comb.parameters()]
    comb.clamp()
    assert all(torch.equal(a, b) for a, b in zip(before, comb.parameters(), strict=True))


@pytest.mark.parametrize(("channels", "monotone"), [((8, 16, 32), False), ((8, 16), True)])
def test_conv_combiner(channels, monotone):
    comb = ConvCombiner(3, main_task=0, channels=channels, monotone=monotone)
    ell = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    out = comb(ell)
    assert out.shape == ()
    convs = [m for m in comb.conv if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [*channels, 1] and convs[-1].bias is None
    torch.testing.assert_close(out, comb.conv(ell).mean() + ell[:, 0].mean())
    w = task_weights(comb, ell)
    assert w.shape == (3,)
    summed = ConvCombiner(3, reduction="sum", channels=channels)
    torch.testing.assert_close(summed(ell) - summed.conv(ell).mean(), ell[:, 0].sum((1, 2)).mean())
    if monotone:
        assert float(w.min()) >= 0 and float(w[0]) >= 1.0  # skip term: main weight >= 1
        _break_monotonicity(comb)
        assert float(task_weights(comb, ell).min()) < 0
        comb.clamp()
        w = task_weights(comb, ell)
        assert torch.isfinite(w).all() and float(w.min()) >= 0


def test_meta_step_then_clamp_keeps_weights_nonnegative():
    """The intended loop: MetaOptimizer.step, then combiner.clamp(). At the minimiser of the
    equally weighted loss, the hypergradient pushes the pure-noise task's weight down, and
    a large step drives it below zero, which clamp() undoes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    truth = x @ torch.ones(5)
    ys = torch.stack([truth, truth + 0.1 * torch.randn(200, generator=g),
                      5 * torch.randn(200, generator=g)], 1)  # main, related, noise
    w = torch.linalg.lstsq(x, ys.mean(1, keepdim=True)).solution.squeeze(1).requires_grad_()
    comb = LinearCombiner(3, monotone=True, weight_norm=False)
    meta = MetaOptimizer(torch.optim.SGD(comb.parameters(), lr=100.0), hpo_lr=0.1)
    per_example = (x @ w).unsqueeze(1).sub(ys).pow(2)  # [200, 3]
    val = ((x @ w - truth) ** 2).mean()
    grads = meta.step(train_loss=comb(per_example), val_loss=val, parameters=[w],
                      aux_params=comb.parameters(), return_grads=True)  # a generator
    assert float(grads[0][0, 2]) > 0 > float(grads[0][0, 0])  # noise down, main up
    assert float(comb.weights[2]) < 0
    comb.clamp()
    assert float(comb.weights.min()) == 0.0 and float(comb.weights[0]) > 1.0


def test_seed_names():
    lin = aux.MonoLinearHyperNet(main_task=0, input_dim=2, skip_connection=True)
    assert isinstance(lin, LinearCombiner) and lin.monotone and lin.skip_connection
    non = aux.NonlinearHyperNet(0, 3, hidden_sizes=4)
    assert isinstance(non, NonlinearCombiner) and not non.monotone
    assert aux.MonoNonlinearHyperNet(0, 3, [3]).monotone
    assert not aux.LinearHyperNet(0, 3).monotone
    cnn = aux.MonoNoFCCNNHyperNet(main_task=0)
    assert [c.out_channels for c in cnn.conv if isinstance(c, torch.nn.Conv2d)] == [8, 16, 1]
    assert len([c for c in aux.NoFCCNNHyperNet(0).conv if isinstance(c, torch.nn.Conv2d)]) == 4


def test_errors():
    with pytest.raises(ValueError, match="main_task"):
        LinearCombiner(3, main_task=3)
    with pytest.raises(ValueError, match="init_value"):
        LinearCombiner(3, monotone=True, init_value=-1.0)
    with pytest.raises(ValueError, match="hidden_sizes"):
        NonlinearCombiner(3, hidden_sizes=())
    with pytest.raises(ValueError, match="reduction"):
        ConvCombiner(3, reduction="max")
    with pytest.raises(ValueError, match=r"\[B, T\] with T=3"):
        LinearCombiner(3)(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"\[B, T, H, W\]"):
        ConvCombiner(3)(torch.rand(4, 3))
