"""The exceptions ``bilevel.data`` raises.

Each carries ``exit_code = 3`` (data missing or failed verification), except an unknown data
set name (``2``, a usage error), which the ``bilevel`` command maps to its exit status without
importing this package.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class of the data package's errors."""

    exit_code: int = 3


class DataMissingError(DataError, FileNotFoundError):
    """A data set is not in the cache; the message gives the exact fetch command."""


class DataVerificationError(DataError, ValueError):
    """A file or a cached array does not match its pinned checksum, or a pickle is unsafe."""


class DataFetchError(DataError, RuntimeError):
    """A source could not be reached or read (no network, wrong ``--from`` folder)."""


class UnknownDatasetError(DataError, KeyError):
    """A data set name that is not in the registry; the message lists the known names.

    A usage error rather than a data problem, so it maps to exit code 2.
    """

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
