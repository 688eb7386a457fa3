"""Against the real ``higher`` (skipped unless the optional ``peers`` extra is installed).

With SGD and momentum both libraries compute the same arithmetic, so a Commentaries-style
loop (BatchNorm student, ``copy_initial_weights=False``, tensor ``override`` of lr and
momentum) must give bit-identical hypergradients in float64. (With Adam they differ by
design: ``higher`` 0.2.1 keeps PyTorch 1.x's Adam formula; ``docs/results.md`` has the
numbers.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel.compat.higher as ours

real = pytest.importorskip("higher")


def _loop(lib):
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    torch.manual_seed(2)
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    momentum = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(6)]
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    override = {"lr": [lr], "momentum": [momentum]}
    with lib.innerloop_ctx(student, opt, copy_initial_weights=False, override=override) as (fnet, diffopt):
        for x, y in data[:-1]:
            c = torch.sigmoid(teacher(x)).squeeze(-1)
            diffopt.step((c * F.cross_entropy(fnet(x), y, reduction="none")).sum())
        F.cross_entropy(fnet(data[-1][0]), data[-1][1]).backward()
    student.load_state_dict(fnet.state_dict())
    grads = [p.grad for p in (*teacher.parameters(), *student.parameters(), lr, momentum)]
    return grads, list(student.state_dict().values())


def test_same_hypergradients_and_student_as_higher():
    g_real, s_real = _loop(real)
    g_ours, s_ours = _loop(ours)
    for a, b in zip(g_ours, g_real, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(s_ours, s_real, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
