"""Pickled sources are read with an allow-list: a tampered pickle is refused and never runs."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from bilevel.data import DataVerificationError, fetch_dataset
from bilevel.data._formats import parse_cifar_batch
from bilevel.data._unpickle import restricted_load
from bilevel.data.images import _convert_mnist
from tests.data._writers import Payload


def test_numpy_arrays_load():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    out = restricted_load(pickle.dumps(arrays, protocol=2))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(out, arrays, strict=True))


def test_reduce_payload_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps((np.zeros(3), Payload(marker)), protocol=2)
    pickle.loads(pickle.dumps(Payload(tmp_path / "control"), protocol=2))  # the payload is live
    assert (tmp_path / "control").exists()
    with pytest.raises(DataVerificationError, match="refusing to unpickle global"):
        restricted_load(blob)
    assert not marker.exists()


def test_tampered_mnist_pickle_refused(tmp_path, data_dir):
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    part = (np.zeros((2, 784), np.float32), Payload(marker))
    with gzip.open(src / "mnist.pkl.gz", "wb") as f:
        pickle.dump((part, part, part), f, protocol=2)
    with pytest.raises(DataVerificationError, match="sha256"):  # refused before unpickling
        fetch_dataset("mnist", from_dir=src)
    with pytest.raises(DataVerificationError, match="refusing"):  # and by the unpickler itself
        _convert_mnist(src)
    assert not marker.exists()
    assert not (data_dir / "mnist" / "arrays.npz").exists()


def test_tampered_cifar_batch_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": Payload(marker)}, protocol=2)
    with pytest.raises(DataVerificationError):
        parse_cifar_batch(blob, b"labels")
    assert not marker.exists()


def test_garbage_is_not_a_pickle():
    with pytest.raises(DataVerificationError, match="not a valid"):
        restricted_load(b"\x80\x02this is not a pickle")
