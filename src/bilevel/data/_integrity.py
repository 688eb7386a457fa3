"""Checksums and crash-safe writes.

Conventions:
    * Raw artefacts are pinned by sha256, or by the publisher's md5 where that is all there is.
    * Arrays are hashed as ``sha256(dtype | shape | C-order bytes)``, so a hash names the values,
      not the container (``.npz`` files embed timestamps).
    * Every write goes to a temporary file in the destination folder and is renamed into place,
      so a failed or refused fetch leaves the previous cache untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from bilevel.data._errors import DataVerificationError

_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, *, sha256: str | None = None, md5: str | None = None) -> str:
    """Verify ``path`` against a pinned digest and return its sha256.

    Raises:
        DataVerificationError: the digest differs (the message names both values).
    """
    if sha256 is None and md5 is None:
        raise ValueError(f"no pinned checksum for {path}; every raw artefact needs one")
    actual = file_digest(path, "sha256")
    if sha256 is not None and actual != sha256:
        raise DataVerificationError(
            f"{path.name}: sha256 {actual} does not match the pinned {sha256}; the file is "
            "corrupted or not the published one. Nothing was replaced; fetch it again."
        )
    if md5 is not None and (got := file_digest(path, "md5")) != md5:
        raise DataVerificationError(
            f"{path.name}: md5 {got} does not match the publisher's {md5}; the file is "
            "corrupted or not the published one. Nothing was replaced; fetch it again."
        )
    return actual


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}|{array.shape}|".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is shared like any download
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_npz(dest: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to a compressed ``.npz`` atomically; object arrays are refused."""
    for key, value in arrays.items():
        if value.dtype == object:
            raise TypeError(f"array {key!r} has dtype object; the cache holds plain arrays only")
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` with ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as z:
        return {key: z[key] for key in z.files}
