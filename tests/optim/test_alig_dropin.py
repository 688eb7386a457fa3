"""AliG as a drop-in for the original package (oval-group/ali-g, ``alig.th.AliG``): its
positional order, a projection that acts at construction, and the README examples (the
authors' and ours in docs/optim.md) run as written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from bilevel.optim import AliG, l2_projection

DOCS = Path(__file__).resolve().parents[2] / "docs" / "optim.md"


def _readme_l2_projection(parameters, max_norm):
    # The in-place projection as the authors' README writes it: `p *= ratio` on leaves
    # that require grad, which only works under no_grad.
    total_norm = torch.sqrt(sum(p.norm() ** 2 for p in parameters))
    if total_norm > max_norm:
        ratio = max_norm / total_norm
        for p in parameters:
            p *= ratio


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return model, x, y


def test_positional_order_is_the_originals():
    """params, max_lr, momentum, projection_fn, eps, adjusted_momentum."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    calls = []
    opt = AliG([w], 0.5, 0.9, lambda: calls.append(1), 0.0, True)
    group = opt.param_groups[0]
    assert (group["max_lr"], group["momentum"], group["adjusted_momentum"]) == (0.5, 0.9, True)
    assert opt.eps == 0.0 and calls == [1]
    # The same step as with keywords: loss 2.5, |g|^2 = 25, eps 0 -> gamma 0.1.
    w.grad = torch.tensor([3.0, 4.0])
    opt.step(lambda: 2.5)
    assert abs(float(opt.step_size) - 0.1) < 1e-7 and calls == [1, 1]
    # adjusted: b = -g; p = p - 0.1 g + 0.1 * 0.9 * b = p - 0.19 g
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) * (1 - 0.19))


def test_projection_runs_under_no_grad_at_construction():
    """The README's in-place projection on parameters that require grad acts at once."""
    w = torch.nn.Parameter(torch.tensor([30.0, 40.0]))  # norm 50
    AliG([w], max_lr=0.1, projection_fn=lambda: _readme_l2_projection([w], max_norm=5.0))
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]))
    assert w.requires_grad and w.grad is None


# The README's `float(loss)` on a tensor that requires grad makes torch (>= 2.6) warn; the
# warning is torch's, about the user's line, and does not change the step.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
def test_authors_readme_examples_run_verbatim():
    """Both usage blocks of the authors' README, with only the import line changed."""
    model, x, y = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    # --- README, "Usage without any regularization" (import changed) ---
    # create AliG optimizer with maximal learning-rate of 0.1
    optimizer = AliG(model.parameters(), max_lr=0.1)

    # AliG can be used with standard pytorch syntax
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    # NB: AliG needs to have access to the current loss value,
    # (this syntax is compatible with standard pytorch optimizers too)
    optimizer.step(lambda: float(loss))
    # --- end ---
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    # --- README, "Usage with the regularization as a constraint" ---
    l2_projection = _readme_l2_projection
    params = list(model.parameters())
    optimizer = AliG(params, max_lr=0.1,
                     projection_fn=lambda: l2_projection(parameters=params, max_norm=100))
    # --- end ---
    with torch.no_grad():
        for p in params:
            p.mul_(1e3)  # outside the ball
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step(lambda: float(loss))
    norm = torch.sqrt(sum(p.detach().norm() ** 2 for p in params))
    assert abs(float(norm) - 100.0) < 1e-3


def _doc_block(heading: str) -> str:
    """The first ```python block after ``heading`` in docs/optim.md."""
    text = DOCS.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match is not None, f"no python block after {heading!r} in {DOCS}"
    return textwrap.dedent(match.group(1))


def test_our_docs_example_runs_verbatim():
    """docs/optim.md's torch-Optimizer block, executed as it stands in the docs."""
    model, x, y = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {"model": model, "x": x, "y": y,
                 "criterion": torch.nn.functional.cross_entropy}
    exec(compile(_doc_block("### The torch Optimizer"), str(DOCS), "exec"), namespace)
    opt = namespace["opt"]
    assert isinstance(opt, AliG) and float(opt.step_size) > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_l2_projection_helper_at_construction():
    """Ours: the joint rescale happens in the constructor, gradients untouched."""
    a = torch.nn.Parameter(torch.full((4,), 10.0))  # norm 20
    AliG([a], 0.1, 0.0, l2_projection([a], max_norm=2.0))
    assert abs(float(a.detach().norm()) - 2.0) < 1e-6
