"""What a data set is to the registry: its raw files, how to convert them, how to split.

A :class:`DatasetSpec` is pure description plus three functions:

* ``obtain(workdir, from_dir)`` puts the verified raw files in ``workdir`` (default:
  :func:`obtain_raw_files`, which copies from ``--from DIR`` or downloads each
  :class:`RawFile` and checks its pinned digest);
* ``convert(workdir)`` reads them into plain numpy arrays (the pickle-free cache);
* ``build(arrays, options)`` turns cached arrays into a :class:`~bilevel.data._dataset.Dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bilevel.data._dataset import Dataset
from bilevel.data._download import copy_from, download
from bilevel.data._integrity import check_file

Arrays = dict[str, np.ndarray]
Converter = Callable[[Path | None], Arrays]


@dataclass(frozen=True)
class RawFile:
    """One published file: where it lives, and its pinned digest (sha256, else publisher md5).

    ``relpath`` is its path under a ``--from DIR`` folder and under the work folder.
    """

    relpath: str
    url: str | None
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class BuildOptions:
    """How :func:`~bilevel.data.load_dataset` splits and scales (see its docstring)."""

    split_seed: int | None = 0
    val_size: int | None = None
    normalize: bool = False


Builder = Callable[[Arrays, BuildOptions], Dataset]
Obtainer = Callable[[Path, Path | None], dict[str, str]]


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: description, raw files, conversion and splitting."""

    name: str
    task: str  # "classification" | "regression" | "language_model"
    summary: str  # sizes and splits, one line
    source: str  # where `fetch` gets it, one line
    convert: Converter
    build: Builder
    raw_files: tuple[RawFile, ...] = ()
    obtain: Obtainer | None = None
    generated: bool = False  # needs no fetch: `convert(None)` makes the arrays offline
    array_sha256: dict[str, str] = field(default_factory=dict)  # pinned converted arrays

    def get_raw(self, workdir: Path, from_dir: Path | None) -> dict[str, str]:
        """Put the verified raw files in ``workdir``; return ``{relpath: sha256}``."""
        if self.obtain is not None:
            return self.obtain(workdir, from_dir)
        return obtain_raw_files(self.raw_files, workdir, from_dir)


def obtain_raw_files(
    files: tuple[RawFile, ...], workdir: Path, from_dir: Path | None
) -> dict[str, str]:
    """Copy (``from_dir``) or download each file into ``workdir`` and verify it.

    Raises:
        DataFetchError: a file is missing from ``from_dir`` or cannot be downloaded.
        DataVerificationError: a file does not match its pinned digest.
    """
    hashes = {}
    for f in files:
        dest = workdir / f.relpath
        if from_dir is not None:
            copy_from(from_dir, f.relpath, dest)
        elif f.url is None:
            raise ValueError(f"{f.relpath} has no public URL; pass --from DIR")
        else:
            download(f.url, dest)
        hashes[f.relpath] = check_file(dest, sha256=f.sha256, md5=f.md5)
    return hashes
