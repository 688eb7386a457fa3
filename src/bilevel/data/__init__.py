"""Data sets as tensors, fetched once with checksums into a pickle-free cache.

    >>> from bilevel.data import load_dataset, IndexSampler
    >>> ds = load_dataset("digits", split_seed=0)
    >>> sampler = IndexSampler(len(ds.train), 32, seed=0)
    >>> idx = next(sampler)
    >>> xb, yb = ds.train.x[idx], ds.train.y[idx]

Fetch with ``bilevel data fetch NAME`` (or :func:`fetch_dataset`); a missing data set raises
:class:`DataMissingError` naming that command. This package imports nothing from ``bilevel``.
See ``docs/data.md`` for sources, checksums and splits.
"""

from bilevel.data._api import (
    REGISTRY,
    fetch_dataset,
    list_datasets,
    load_dataset,
    read_arrays,
    verify_dataset,
)
from bilevel.data._dataset import Dataset, Split
from bilevel.data._errors import DataError, DataFetchError, DataMissingError, DataVerificationError
from bilevel.data._paths import default_data_dir
from bilevel.data._sampler import IndexSampler
from bilevel.data.repeat_copy import RepeatCopy, repeat_copy_accuracy, repeat_copy_loss
from bilevel.data.text import batchify

__all__ = [
    "REGISTRY",
    "DataError",
    "DataFetchError",
    "DataMissingError",
    "DataVerificationError",
    "Dataset",
    "IndexSampler",
    "RepeatCopy",
    "Split",
    "batchify",
    "default_data_dir",
    "fetch_dataset",
    "list_datasets",
    "load_dataset",
    "read_arrays",
    "repeat_copy_accuracy",
    "repeat_copy_loss",
    "verify_dataset",
]
