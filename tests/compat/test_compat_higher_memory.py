"""Memory of bilevel.compat.higher stays flat over many inner loops (higher's top complaint).

Live memory is counted exactly, without allocator statistics (there are none on CPU): a
``TorchDispatchMode`` records a weak reference to the storage of every tensor any op
creates, including those the autograd graph keeps without a Python object; the live bytes
are the sizes of the storages not yet freed. Each test has a leaky twin (keeping every
patched module, or tracking the graph) that must grow, so the measurement can fail.
"""

from __future__ import annotations

import torch
from torch import nn

import bilevel.compat.higher as higher
from tests.hypergrad.live_bytes import LiveBytes  # one live-storage counter for all tests


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1)).double()
    log_wd = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randn(8, 1, generator=g, dtype=torch.float64)) for _ in range(4)]
    return model, log_wd, data


def _outer_loops(n: int, *, keep: bool) -> list[int]:
    """Commentaries-style outer loop; live bytes after loop 20 and after loop n."""
    model, log_wd, data = _setup()
    meta_opt = torch.optim.Adam([log_wd], lr=0.01)
    kept, marks = [], []
    with LiveBytes() as tracker:
        for it in range(n):
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fnet, diffopt):
                for x, y in data[:2]:  # a learned loss scale stands in for the teacher
                    diffopt.step(torch.exp(log_wd) * ((fnet(x) - y) ** 2).mean())
                meta = ((fnet(data[3][0]) - data[3][1]) ** 2).mean()
                meta.backward()
            model.load_state_dict(fnet.state_dict())
            meta_opt.step()
            meta_opt.zero_grad()
            model.zero_grad()
            if keep:
                kept.append(fnet)
            if it + 1 in (20, n):
                marks.append(tracker.live)
    return marks


def test_memory_is_flat_over_200_outer_loops():
    at_20, at_200 = _outer_loops(200, keep=False)
    assert at_200 == at_20, (at_20, at_200)
    leaky_20, leaky_40 = _outer_loops(40, keep=True)
    assert leaky_40 > 1.5 * leaky_20  # keeping every patched module does grow


def _inner_steps(n: int, *, track: bool) -> list[int]:
    model, _, data = _setup()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    marks = []
    with LiveBytes() as tracker, higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, track_higher_grads=track
    ) as (fnet, diffopt):
        for it in range(n):
            x, y = data[it % 4]
            diffopt.step(((fnet(x) - y) ** 2).mean())
            if it + 1 in (20, n):
                marks.append(tracker.live)
    return marks


def test_track_higher_grads_false_is_flat_over_200_inner_steps():
    at_20, at_200 = _inner_steps(200, track=False)
    assert at_200 == at_20, (at_20, at_200)
    tracked_20, tracked_40 = _inner_steps(40, track=True)
    assert tracked_40 > 1.5 * tracked_20  # differentiating through the steps keeps them
