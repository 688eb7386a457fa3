"""IndexSampler resumes bit-for-bit; splits are deterministic; the global RNG is untouched."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from bilevel.data import IndexSampler, load_dataset
from bilevel.data._dataset import holdout


def _take(sampler: IndexSampler, k: int) -> list[torch.Tensor]:
    return [next(sampler) for _ in range(k)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_continues_the_same_order(drop_last):
    ref = _take(IndexSampler(10, 3, seed=7, drop_last=drop_last), 12)
    first = IndexSampler(10, 3, seed=7, drop_last=drop_last)
    _take(first, 5)  # stop mid-epoch
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = IndexSampler(10, 3, seed=123, drop_last=drop_last)  # seed comes from the state
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 7), ref[5:], strict=True))


def test_epochs_cover_every_row_once_and_differ():
    s = IndexSampler(12, 4, seed=0)
    assert s.steps_per_epoch == 3
    e1, e2 = torch.cat(_take(s, 3)), torch.cat(_take(s, 3))
    assert sorted(e1.tolist()) == list(range(12)) == sorted(e2.tolist())
    assert not torch.equal(e1, e2) and s.epoch == 1
    assert e1.dtype == torch.long


def test_drop_last_and_partial_batches():
    assert [len(b) for b in _take(IndexSampler(10, 4, drop_last=True), 3)] == [4, 4, 4]
    assert [len(b) for b in _take(IndexSampler(10, 4, drop_last=False), 3)] == [4, 4, 2]
    with pytest.raises(ValueError, match="drop_last"):
        IndexSampler(3, 4)


def test_sampler_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(IndexSampler(100, 10, seed=1), 25)
    assert torch.equal(torch.rand(3), expected)


def test_load_state_rejects_other_shapes():
    s = IndexSampler(10, 2)
    with pytest.raises(ValueError, match="batch_size"):
        IndexSampler(10, 5).load_state_dict(s.state_dict())


def test_holdout_matches_random_split():
    n, val, seed = 50, 12, 3
    train, va = holdout(n, val, seed)
    a, b = torch.utils.data.random_split(range(n), [n - val, val], generator=torch.Generator().manual_seed(seed))
    assert list(train) == list(a.indices) and list(va) == list(b.indices)
    assert list(holdout(n, val, None)[1]) == list(range(n - val, n))


def test_digits_splits_deterministic_and_disjoint():
    a, b, c = load_dataset("digits", split_seed=0), load_dataset("digits", split_seed=0), load_dataset("digits", split_seed=1)
    assert a.sizes() == (1200, 300, 297) and a.info["num_classes"] == 10
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert torch.equal(a.test.x, c.test.x)  # the test rows never depend on split_seed
    assert set(torch.bincount(a.train.y).tolist()) and a.train.x.max() <= 1
    assert a.train.x.dtype == torch.float32 and a.train.y.dtype == torch.int64


def test_mnist1d_generated_offline_with_global_rng_restored(data_dir):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ds = load_dataset("mnist1d")  # not cached: generated in memory (make_dataset seeds 42)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    assert ds.sizes() == (3500, 500, 1000) and ds.train.x.shape == (3500, 40)
    counts = torch.bincount(torch.cat([ds.train.y, ds.val.y]), minlength=10)
    assert counts.sum() == 4000 and counts.min() > 300  # balanced classes
    assert not (data_dir / "mnist1d").exists()  # loading never writes
