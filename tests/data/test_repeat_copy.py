"""The repeat-copy task: the layout of every sequence, ranges, determinism, checkpoint
resume, and the objective's two reference values (0 for a perfect copier, ln 2 per
scored bit for logits 0)."""

from __future__ import annotations

import math

import torch

from bilevel.data import RepeatCopy, repeat_copy_accuracy, repeat_copy_loss


def _decode(batch, b: int, num_bits: int):
    """(L, R, pattern) of sequence ``b``, read back from its observation."""
    obs = batch.observations[:, b]
    assert obs[0, num_bits] == 1 and obs[1:, num_bits].sum() == 0  # start marker at step 0
    flag_at = int(obs[:, num_bits + 1].nonzero())
    L, R = flag_at - 1, round(float(obs[flag_at, num_bits + 1]) * 10)
    return L, R, obs[1 : L + 1, :num_bits]


def test_every_sequence_has_the_repeat_copy_layout():
    task = RepeatCopy(num_bits=4, batch_size=64, seed=3)
    seen = set()
    for _ in range(5):
        batch = next(task)
        T = batch.mask.shape[0]
        lengths = []
        assert batch.observations.shape == (T, 64, 6) and batch.target.shape == (T, 64, 5)
        for b in range(64):
            L, R, pattern = _decode(batch, b, 4)
            seen.add((L, R))
            lengths.append(L * (R + 1) + 3)
            start, end = L + 2, L + 2 + L * R  # answer steps, then the end marker
            assert torch.equal(batch.target[start:end, b, :4], pattern.repeat(R, 1))
            assert batch.target[end, b, 4] == 1 and batch.target[:, b, 4].sum() == 1
            assert batch.target[:start, b].sum() == 0 and batch.target[end + 1 :, b].sum() == 0
            mask = torch.zeros(T)
            mask[start : end + 1] = 1
            assert torch.equal(batch.mask[:, b], mask)
            assert batch.observations[L + 2 :, b].sum() == 0  # nothing shown while answering
        assert max(lengths) == T  # padded to the longest sequence of the batch
    assert seen == {(1, 1), (1, 2), (2, 1), (2, 2)}  # lengths 1-2, repeats 1-2


def test_same_seed_same_stream_and_resume_from_state_dict():
    a, b = RepeatCopy(seed=5), RepeatCopy(seed=5)
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]
    resumed = RepeatCopy(seed=5)
    resumed.load_state_dict(state)
    for e in expected:
        assert all(torch.equal(u, v) for u, v in zip(e, next(resumed), strict=True))
    assert resumed.batches == a.batches == 7
    other = next(RepeatCopy(seed=6))
    assert not torch.equal(other.observations, RepeatCopy(seed=5).__next__().observations)


def test_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(RepeatCopy(seed=1))
    assert torch.equal(before, torch.get_rng_state())


def test_objective_reference_values_and_accuracy():
    batch = next(RepeatCopy(num_bits=4, batch_size=16, seed=0))
    perfect = (batch.target * 2 - 1) * 30.0
    assert float(repeat_copy_loss(perfect, batch.target, batch.mask)) < 1e-10
    assert float(repeat_copy_accuracy(perfect, batch.target, batch.mask)) == 1.0
    zero = torch.zeros_like(batch.target)
    scored_bits = float(batch.mask.sum()) * 5
    assert math.isclose(float(repeat_copy_loss(zero, batch.target, batch.mask)),
                        math.log(2) * scored_bits / 16, rel_tol=1e-6)
    # One wrong bit in one scored step of sequence 0 fails that sequence only.
    wrong = perfect.clone()
    t = int(batch.mask[:, 0].nonzero()[0])
    wrong[t, 0, 0] *= -1
    assert math.isclose(float(repeat_copy_accuracy(wrong, batch.target, batch.mask)), 15 / 16)
    # Unscored steps do not count.
    junk = perfect.clone()
    junk[0] = 5.0
    assert float(repeat_copy_loss(junk, batch.target, batch.mask)) < 1e-10
