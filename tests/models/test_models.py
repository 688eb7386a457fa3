"""Every model: forward shape, pinned parameter count, and a functional_call round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bilevel.models import (
    DNC,
    MLP,
    CBRStudent,
    CBRTeacher,
    LSTMLanguageModel,
    resnet18,
    resnet34,
)
from bilevel.recipes.gtn.models import GTNLearner, GTNTeacher


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (factory, inputs, output shape, parameter count quoted in the docstrings)
CASES = {
    "mlp_uci": (lambda: MLP([8, 50, 1]), lambda: (torch.randn(4, 8),), (4, 1), 501),
    "mlp_fmnist": (lambda: MLP([784, 50, 10], batch_norm=True), lambda: (torch.rand(4, 1, 28, 28),), (4, 10), 39_860),
    "cbr_student_mnist": (lambda: CBRStudent(1, 10), lambda: (torch.rand(4, 1, 28, 28),), (4, 10), 20_170),
    "cbr_student_cifar": (lambda: CBRStudent(3, 10, image_size=32), lambda: (torch.rand(4, 3, 32, 32),), (4, 10), 23_690),
    "cbr_teacher_curr": (lambda: CBRTeacher(1), lambda: (torch.rand(4, 1, 28, 28), 0.25), (4, 1), 20_385),
    "cbr_teacher_curr_cifar": (lambda: CBRTeacher(3, image_size=32), lambda: (torch.rand(4, 3, 32, 32), torch.rand(4)), (4, 1), 22_177),
    "cbr_teacher_nocurr": (lambda: CBRTeacher(1, iteration_channel=False), lambda: (torch.rand(4, 1, 28, 28),), (4, 1), 19_585),
    "resnet18": (lambda: resnet18(10), lambda: (torch.rand(2, 3, 32, 32),), (2, 10), 11_173_962),
    "resnet34_c100": (lambda: resnet34(100), lambda: (torch.rand(2, 3, 32, 32),), (2, 100), 21_328_292),
    "gtn_learner": (lambda: GTNLearner(), lambda: (torch.rand(4, 1, 28, 28),), (4, 10), 106_910),
    "gtn_teacher": (lambda: GTNTeacher(), lambda: (torch.randn(4, 64), torch.arange(4)), (4, 1, 28, 28), 3_331_011),
    "dnc_repeat_copy": (lambda: DNC(6, 5), lambda: (torch.rand(9, 16, 6),), (9, 16, 5), 43_980),
    "lstm_lm": (lambda: LSTMLanguageModel(), lambda: (torch.randint(0, 10_000, (5, 2)),), (5, 2, 10_000), 19_780_400),
}


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_parameter_count(name):
    factory, inputs, shape, count = CASES[name]
    torch.manual_seed(0)
    model = factory()
    assert _count(model) == count
    assert tuple(_out(model(*inputs())).shape) == shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_functional_call_round_trip(name):
    factory, inputs, _, _ = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()  # eval: BatchNorm uses running statistics, so calls are comparable
    args = inputs()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    expected = _out(model(*args))
    got = _out(functional_call(model, params, args))
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), list(params.values()), allow_unused=True)
    unused = [k for k, g in zip(params, grads, strict=True) if g is None]
    assert not unused, f"parameters that do not reach the output: {unused}"
    shifted = {k: v.detach() + 0.05 for k, v in params.items()}
    assert not torch.allclose(_out(functional_call(model, shifted, args)), expected)


def test_log_probabilities_and_ranges():
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(CBRStudent()(x).exp().sum(1), torch.ones(4))
    assert torch.allclose(GTNLearner()(x).exp().sum(1), torch.ones(4))
    w = CBRTeacher()(x, torch.full((4,), 0.5))
    assert torch.all((w > 0) & (w < 1))
    img = GTNTeacher()(torch.randn(4, 64), torch.tensor([0, 1, 2, 3]))
    assert torch.all(img.abs() < 1)


def test_original_gtn_teacher_size_without_allocating():
    with torch.device("meta"):
        teacher = GTNTeacher.original()
    assert _count(teacher) == 103_014_403 and teacher.fc2.weight.numel() == 102_760_448


def test_unrolled_second_order_through_a_student():
    # The bilevel use: a differentiable SGD step on the student, then d(val loss)/d(weights).
    student, teacher = CBRStudent(), CBRTeacher()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    params = dict(student.named_parameters())
    weights = teacher(x, 0.0).squeeze(1)
    loss = (weights * nn.functional.nll_loss(functional_call(student, params, (x,)), y, reduction="none")).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    new = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads, strict=True)}
    meta = nn.functional.nll_loss(functional_call(student, new, (x,)), y)
    tg = torch.autograd.grad(meta, list(teacher.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in tg)


def test_lstm_hidden_state_carries_over():
    m = LSTMLanguageModel(30, embedding_dim=8, hidden_size=8)
    tokens = torch.randint(0, 30, (6, 3))
    full, _ = m(tokens)
    first, h = m(tokens[:3])
    second, _ = m(tokens[3:], LSTMLanguageModel.detach_hidden(h))
    torch.testing.assert_close(torch.cat([first, second]), full)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="widths"):
        MLP([10])
    with pytest.raises(ValueError, match="activation"):
        MLP([2, 2], "swishy")
    with pytest.raises(ValueError, match="progress"):
        CBRTeacher()(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="multiple"):
        GTNTeacher(map_size=5)
