"""Each official format, written tiny by the test, goes through fetch -> cache -> load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bilevel.data import REGISTRY, DataVerificationError, fetch_dataset, images, load_dataset
from bilevel.data._spec import RawFile
from bilevel.data.images import FASHION_IDX_CONTENT_SHA256, MNIST_IDX_MD5
from tests.data._writers import cifar_batch, md5, write_mnist_idx, write_tar


def _unpin_arrays(monkeypatch, name: str) -> None:
    """Drop a spec's pinned array sha256s (the real pins are tested to refuse tiny files)."""
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], array_sha256={}))


def _pin_fashion_content(monkeypatch, folder) -> None:
    for name in FASHION_IDX_CONTENT_SHA256:
        monkeypatch.setitem(FASHION_IDX_CONTENT_SHA256, name, images._content_sha256(folder / name))
    _unpin_arrays(monkeypatch, "fashion_mnist")


def _pin_to(monkeypatch, name: str, folder) -> None:
    """Point a spec's pinned md5s at the tiny files (the real pins are tested to refuse them)."""
    spec = REGISTRY[name]
    files = tuple(RawFile(f.relpath, None, md5=md5(folder / f.relpath)) for f in spec.raw_files)
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, raw_files=files))


def test_fashion_mnist_idx(data_dir, tmp_path, monkeypatch):
    write_mnist_idx(tmp_path / "src", 30, 10)
    with pytest.raises(DataVerificationError, match=r"train-images-idx3-ubyte\.gz: decompressed sha256"):
        fetch_dataset("fashion_mnist", from_dir=tmp_path / "src")
    _pin_fashion_content(monkeypatch, tmp_path / "src")
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
    with pytest.raises(DataVerificationError, match="'x_train' converted from the source"):
        fetch_dataset("mnist", from_dir=tmp_path / "src")  # the array pins refuse them too
    _unpin_arrays(monkeypatch, "mnist")
    fetch_dataset("mnist", from_dir=tmp_path / "src")
    ds = load_dataset("mnist", val_size=4, split_seed=None)
    assert ds.sizes() == (16, 4, 10) and ds.info["input_shape"] == (1, 28, 28)
    assert torch.equal(ds.val.y, torch.tensor([6, 7, 8, 9]))  # split_seed=None: the last rows


def test_fashion_mnist_from_the_debian_package_folder(data_dir, tmp_path, monkeypatch):
    """Without --from, fetch reads Debian's folder when the package is installed (no network)."""
    write_mnist_idx(tmp_path / "deb", 12, 6, seed=2)
    monkeypatch.setattr(images, "FASHION_DEBIAN_DIR", tmp_path / "deb")
    with pytest.raises(DataVerificationError, match="decompressed sha256"):
        fetch_dataset("fashion_mnist")  # the real pins refuse the tiny files
    _pin_fashion_content(monkeypatch, tmp_path / "deb")
    manifest = fetch_dataset("fashion_mnist")
    assert set(manifest["raw_sha256"]) == set(FASHION_IDX_CONTENT_SHA256)
    assert load_dataset("fashion_mnist", val_size=2).sizes() == (10, 2, 6)


@pytest.mark.skipif(not all((images.FASHION_DEBIAN_DIR / n).is_file() for n in FASHION_IDX_CONTENT_SHA256),
                    reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
def test_real_fashion_mnist_from_debian_matches_the_pins(data_dir):
    fetch_dataset("fashion_mnist")  # checks the decompressed-file and the array pins
    ds = load_dataset("fashion_mnist")
    assert ds.sizes() == (50_000, 10_000, 10_000)
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10


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
