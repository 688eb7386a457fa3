"""Tiny files in the publishers' exact formats, written by the tests themselves."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: two zero bytes, type 0x08 (uint8), ndim, big-endian int32 dims, data; gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_idx(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def cifar_batch(n: int, label_key: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"test batch", label_key: [int(i % 10) for i in range(n)],
             b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    return pickle.dumps(batch, protocol=2)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


class Payload:
    """A pickle payload: unpickling it would create ``marker`` (it must never run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
