"""Each official format, written tiny by the test, goes through fetch -> cache -> load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bilevel.data import REGISTRY, DataVerificationError, fetch_dataset, load_dataset
from bilevel.data._spec import RawFile
from bilevel.data.images import MNIST_IDX_MD5
from tests.data._writers import cifar_batch, md5, write_mnist_idx, write_tar


def _pin_to(monkeypatch, name: str, folder) -> None:
    """Point a spec's pinned md5s at the tiny files (the real pins are tested to refuse them)."""
    spec = REGISTRY[name]
    files = tuple(RawFile(f.relpath, None, md5=md5(folder / f.relpath)) for f in spec.raw_files)
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, raw_files=files))


def test_fashion_mnist_idx(data_dir, tmp_path, monkeypatch):
    write_mnist_idx(tmp_path / "src", 30, 10)
    with pytest.raises(DataVerificationError, match="md5"):
        fetch_dataset("fashion_mnist", from_dir=tmp_path / "src")
    _pin_to(monkeypatch, "fashion_mnist", tmp_path / "src")
    fetch_dataset("fashion_mnist", from_dir=tmp_path / "src")
    ds = load_dataset("fashion_mnist", val_size=5)
    assert ds.sizes() == (25, 5, 10) and ds.train.x.shape == (25, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and ds.train.x.min() >= 0 and ds.train.x.max() <= 1
    assert ds.test.y.tolist() == list(range(10))


def test_mnist_from_idx_files(data_dir, tmp_path, monkeypatch):
    write_mnist_idx(tmp_path / "src", 20, 10, seed=1)
    with pytest.raises(DataVerificationError, match="md5"):
        fetch_dataset("mnist", from_dir=tmp_path / "src")
    for name in MNIST_IDX_MD5:
        monkeypatch.setitem(MNIST_IDX_MD5, name, md5(tmp_path / "src" / name))
    fetch_dataset("mnist", from_dir=tmp_path / "src")
    ds = load_dataset("mnist", val_size=4, split_seed=None)
    assert ds.sizes() == (16, 4, 10) and ds.info["input_shape"] == (1, 28, 28)
    assert torch.equal(ds.val.y, torch.tensor([6, 7, 8, 9]))  # split_seed=None: the last rows


@pytest.mark.parametrize(("name", "archive", "train", "test", "key", "classes"), [
    ("cifar10", "cifar-10-python.tar.gz", [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
     "cifar-10-batches-py/test_batch", b"labels", 10),
    ("cifar100", "cifar-100-python.tar.gz", ["cifar-100-python/train"], "cifar-100-python/test", b"fine_labels", 100),
])
def test_cifar_python_batches(name, archive, train, test, key, classes, data_dir, tmp_path, monkeypatch):
    members = {m: cifar_batch(4, key, seed=i) for i, m in enumerate(train)}
    members[test] = cifar_batch(6, key, seed=99)
    (tmp_path / "src").mkdir()
    write_tar(tmp_path / "src" / archive, members)
    with pytest.raises(DataVerificationError, match="md5"):
        fetch_dataset(name, from_dir=tmp_path / "src")
    _pin_to(monkeypatch, name, tmp_path / "src")
    fetch_dataset(name, from_dir=tmp_path / "src")
    ds = load_dataset(name, val_size=2, normalize=True)
    n = 4 * len(train)
    assert ds.sizes() == (n - 2, 2, 6) and ds.train.x.shape[1:] == (3, 32, 32)
    assert ds.info["num_classes"] == classes and ds.info["normalized"]
    plain = load_dataset(name, val_size=2)
    pixels = np.random.default_rng(99).integers(0, 256, (6, 3072)).astype(np.uint8)  # as written
    assert torch.equal((plain.test.x * 255).round().to(torch.uint8), torch.from_numpy(pixels).view(6, 3, 32, 32))


def test_svhn_mat(data_dir, tmp_path, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for name, n in (("train_32x32.mat", 12), ("test_32x32.mat", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        savemat(tmp_path / "src" / name, {"X": x, "y": (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)})
    _pin_to(monkeypatch, "svhn", tmp_path / "src")
    fetch_dataset("svhn", from_dir=tmp_path / "src")
    ds = load_dataset("svhn", val_size=2, split_seed=None)
    assert ds.sizes() == (10, 2, 5)
    assert ds.test.y.tolist() == [1, 2, 3, 4, 5] and ds.val.y.tolist() == [1, 2]  # label 10 -> digit 0
    assert torch.all(ds.train.y < 10)


def test_ptb_text(data_dir, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ptb.train.txt").write_text(" the cat sat on the mat \n the dog <unk> \n")
    (src / "ptb.valid.txt").write_text(" the cat \n")
    (src / "ptb.test.txt").write_text(" the dog sat \n")
    _pin_to(monkeypatch, "ptb", src)
    fetch_dataset("ptb", from_dir=src)
    ds = load_dataset("ptb")
    vocab = ds.info["vocab"]
    assert vocab[:3] == ("the", "cat", "sat") and "<eos>" in vocab and ds.info["vocab_size"] == len(vocab)
    assert len(ds.train) == 11 - 1 and torch.equal(ds.train.x[1:], ds.train.y[:-1])
    words = [vocab[i] for i in ds.test.x.tolist()] + [vocab[ds.test.y[-1]]]
    assert words == ["the", "dog", "sat", "<eos>"]


def test_ptb_word_outside_vocabulary_refused(data_dir, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for part, text in (("train", "a b\n"), ("valid", "a\n"), ("test", "zebra\n")):
        (src / f"ptb.{part}.txt").write_text(text)
    _pin_to(monkeypatch, "ptb", src)
    with pytest.raises(DataVerificationError, match="zebra"):
        fetch_dataset("ptb", from_dir=src)
