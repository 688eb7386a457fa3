"""DNC: addressing on hand-made cases (content, usage, allocation, link, directional
reads), the parameter count of the AliG sizes, batch independence and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel.models import DNC
from bilevel.models import dnc_addressing as addr

D = torch.float64


def test_content_weighting_is_softmax_of_strength_times_cosine():
    memory = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]], dtype=D)  # [1, 3, 2]
    keys = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]], dtype=D)  # [1, 2, 2]
    strengths = torch.tensor([[3.0, 0.5]], dtype=D)
    got = addr.content_weighting(memory, keys, strengths)
    for h, cosines in enumerate(([1.0, 0.0, -1.0], [2 ** -0.5, 2 ** -0.5, -(2 ** -0.5)])):
        logits = strengths[0, h] * torch.tensor(cosines, dtype=D)
        assert torch.allclose(got[0, h], torch.softmax(logits, 0), atol=1e-6)
    # Zero memory (the initial state): uniform weights, finite gradients.
    zero = torch.zeros(1, 4, 2, dtype=D, requires_grad=True)
    w = addr.content_weighting(zero, keys, strengths)
    assert torch.allclose(w, torch.full_like(w, 0.25))
    (w * torch.arange(4.0, dtype=D)).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_usage_update():
    usage = torch.tensor([[0.5, 0.0, 1.0]], dtype=D)
    write = torch.tensor([[0.5, 1.0, 0.0]], dtype=D)
    free = torch.tensor([[1.0, 0.5]], dtype=D)  # two read heads
    reads = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]], dtype=D)
    # (u + w - u w) = [0.75, 1, 1]; retention = [(1-0)(1-0.5), 1, (1-1)(1-0)] = [0.5, 1, 0]
    got = addr.update_usage(usage, write, free, reads)
    assert torch.allclose(got, torch.tensor([[0.375, 1.0, 0.0]], dtype=D))


def test_allocation_orders_slots_by_usage():
    usage = torch.tensor([[0.4, 0.1, 0.9], [1.0, 1.0, 0.0]], dtype=D)
    a = addr.allocation_weighting(usage)
    # free list (ascending usage) 1, 0, 2: a = (1-.1), (1-.4)(.1), (1-.9)(.1)(.4)
    assert torch.allclose(a[0], torch.tensor([0.06, 0.9, 0.004], dtype=D), atol=1e-5)
    assert torch.allclose(a[1], torch.tensor([0.0, 0.0, 1.0], dtype=D), atol=1e-5)
    assert a[0].argmax() == 1 and a[0].argmin() == 2


def test_temporal_link_records_write_order_and_reads_follow_it():
    N = 3
    link, prec = torch.zeros(1, N, N, dtype=D), torch.zeros(1, N, dtype=D)
    for slot in (0, 2, 1):  # write slots 0, then 2, then 1
        w = torch.nn.functional.one_hot(torch.tensor([slot]), N).to(D)
        link = addr.update_link(link, prec, w)
        prec = addr.update_precedence(prec, w)
    expected = torch.zeros(N, N, dtype=D)
    expected[2, 0] = expected[1, 2] = 1.0  # L[i, j] = 1: i was written right after j
    assert torch.allclose(link[0], expected)
    assert torch.allclose(prec[0], torch.tensor([0.0, 1.0, 0.0], dtype=D))
    reading = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=D)  # heads at 0 and 1
    forward, backward = addr.directional_weightings(link, reading)
    assert torch.allclose(forward[0], torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=D))
    assert torch.allclose(backward[0], torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=D))


def test_link_update_with_soft_weights_and_zero_diagonal():
    link = torch.tensor([[[0.0, 0.5], [0.25, 0.0]]], dtype=D)
    prec = torch.tensor([[0.2, 0.6]], dtype=D)
    w = torch.tensor([[0.3, 0.1]], dtype=D)
    got = addr.update_link(link, prec, w)
    # L[0,1] = (1 - .3 - .1) .5 + .3 (.6) = .48; L[1,0] = (1 - .1 - .3) .25 + .1 (.2) = .17
    assert torch.allclose(got[0], torch.tensor([[0.0, 0.48], [0.17, 0.0]], dtype=D))
    assert torch.allclose(addr.update_precedence(prec, w), torch.tensor([[0.42, 0.46]], dtype=D))
    # p = (1 - .4) [.2, .6] + [.3, .1]


def test_write_memory_erases_then_adds():
    memory = torch.ones(1, 2, 2, dtype=D)
    w = torch.tensor([[1.0, 0.5]], dtype=D)
    got = addr.write_memory(memory, w, torch.tensor([[1.0, 0.0]], dtype=D),
                            torch.tensor([[2.0, 4.0]], dtype=D))
    assert torch.allclose(got[0], torch.tensor([[2.0, 5.0], [1.5, 3.0]], dtype=D))


def test_parameter_count_of_the_alig_dnc():
    model = DNC(6, 5)  # 4-bit repeat copy; 64 units, 16x16 memory, 4 reads
    assert sum(p.numel() for p in model.parameters()) == 43_980


def test_batch_elements_are_independent_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = DNC(6, 5, hidden_size=8, memory_size=5, word_size=4, num_reads=2).double()
    x = torch.randn(7, 3, 6, dtype=D)
    out = model(x)
    assert out.shape == (7, 3, 5)
    for b in range(3):
        assert torch.allclose(model(x[:, b : b + 1])[:, 0], out[:, b], atol=1e-10)
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_weightings_stay_sub_stochastic():
    """Read and write weightings sum to at most 1 (link rows sum to <= 1, so the
    directional reads do too); usage stays in [0, 1]."""
    torch.manual_seed(1)
    model = DNC(6, 5).double()
    state = model.initial_state(4, like=torch.zeros((), dtype=D))
    for x in torch.randn(5, 4, 6, dtype=D).unbind(0):
        state = model.step(x, state)
        sums = state.read_weights.sum(-1)
        assert ((sums > 0) & (sums <= 1 + 1e-9)).all()
        assert (state.link.sum(-1) <= 1 + 1e-9).all()
        assert (state.write_weights.sum(-1) <= 1 + 1e-9).all()
        assert ((state.usage >= 0) & (state.usage <= 1 + 1e-9)).all()


@pytest.mark.parametrize("clip", [None, 20.0])
def test_output_clipping(clip):
    model = DNC(6, 5, clip_value=clip)
    with torch.no_grad():
        model.output.bias.fill_(100.0)
    out = model(torch.zeros(2, 1, 6)).detach()
    assert math.isclose(float(out.max()), 20.0) if clip else float(out.max()) > 50
