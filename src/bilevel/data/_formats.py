"""Readers for the publishers' file formats: IDX, CIFAR python batches, SVHN .mat, PTB text.

Each reader returns plain numpy arrays and validates dtypes and shapes, so a file that parses
but holds the wrong thing is refused rather than silently cached.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np

from bilevel.data._errors import DataVerificationError
from bilevel.data._unpickle import restricted_load

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``*-ubyte`` or ``*-ubyte.gz``, the MNIST/Fashion-MNIST format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataVerificationError(f"{path.name} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataVerificationError(
            f"{path.name}: header says {tuple(dims)} ({expected} bytes), file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims)).astype(dtype.newbyteorder("="))


def read_cifar_tar(archive: Path, members: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python batches from the published ``.tar.gz`` without extracting it.

    Args:
        archive: ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``.
        members: member paths in order, e.g. ``cifar-10-batches-py/data_batch_1``.
        label_key: ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

    Returns:
        ``(pixels uint8 [n, 3, 32, 32], labels int64 [n])`` concatenated over ``members``.
    """
    xs, ys = [], []
    with tarfile.open(archive, "r:*") as tf:
        for name in members:
            try:
                member = tf.getmember(name)
            except KeyError as exc:
                raise DataVerificationError(f"{archive.name} has no member {name}") from exc
            stream = tf.extractfile(member) if member.isfile() else None
            if stream is None:
                raise DataVerificationError(f"{archive.name}: {name} is not a regular file")
            x, y = parse_cifar_batch(stream.read(), label_key, name)
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def parse_cifar_batch(blob: bytes, label_key: bytes, name: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR batch pickle (a dict with ``b"data"`` uint8 ``[n, 3072]``) safely."""
    batch = restricted_load(blob, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataVerificationError(f"{name}: not a CIFAR batch (needs keys b'data', {label_key!r})")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataVerificationError(f"{name}: b'data' must be uint8 [n, 3072]")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataVerificationError(f"{name}: {label_key!r} must hold {data.shape[0]} integers")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN ``*_32x32.mat`` file: ``X`` uint8 ``[32, 32, 3, n]``, ``y`` in 1..10.

    Returns:
        ``(pixels uint8 [n, 3, 32, 32], labels int64 [n])`` with label 10 mapped to digit 0.
    """
    from scipy.io import loadmat  # optional dependency: the `data` extra

    mat = loadmat(path)
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataVerificationError(f"{path.name}: X must be uint8 [32, 32, 3, n]")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3] or y.min(initial=1) < 1 or y.max(initial=10) > 10:
        raise DataVerificationError(f"{path.name}: y must hold {x.shape[3]} labels in 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def read_ptb_tokens(path: Path) -> list[str]:
    """Words of a PTB text file, each line followed by ``<eos>`` (as Zaremba et al. and the seed)."""
    with open(path, encoding="utf-8") as f:
        return [w for line in f for w in [*line.split(), "<eos>"]]


def build_vocab(tokens: list[str]) -> list[str]:
    """Words in order of first appearance (the PyTorch word-language-model convention)."""
    return list(dict.fromkeys(tokens))


def encode(tokens: list[str], vocab: list[str], name: str) -> np.ndarray:
    """Token ids under ``vocab``; a word outside it is refused (PTB test words are all in train)."""
    index = {w: i for i, w in enumerate(vocab)}
    try:
        return np.fromiter((index[w] for w in tokens), dtype=np.int64, count=len(tokens))
    except KeyError as exc:
        raise DataVerificationError(f"{name}: word {exc.args[0]!r} is not in the training vocabulary") from exc
