"""A restricted unpickler for the pickled sources (the MNIST pickle, CIFAR batches).

Unpickling runs arbitrary code named by the stream (``__reduce__`` payloads). This reader
resolves only an allow-list of globals, enough to rebuild numpy arrays, and refuses anything
else *before* it is imported or called, so a tampered file raises and its payload never runs.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import IO, Any

from bilevel.data._errors import DataVerificationError

# (module, name) pairs a numpy-array pickle needs, Python 2 and 3 spellings.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataVerificationError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed "
                "in a data file. The file is not the published one; delete it and fetch again."
            )
        # numpy 2 moved numpy.core to numpy._core; import the new name to skip the shim.
        module = module.replace("numpy.core.", "numpy._core.")
        return getattr(importlib.import_module(module), name)


def restricted_load(stream: IO[bytes] | bytes, *, encoding: str = "latin1") -> Any:
    """Unpickle ``stream`` with :class:`RestrictedUnpickler`.

    Args:
        stream: a binary file object, or the pickle's bytes.
        encoding: how Python 2 ``str`` objects decode (``"latin1"`` for arrays,
            ``"bytes"`` to keep CIFAR's byte-string keys).

    Raises:
        DataVerificationError: the stream names a global outside the allow-list, or is not
            a valid pickle.
    """
    if isinstance(stream, bytes | bytearray):
        stream = io.BytesIO(stream)
    try:
        return RestrictedUnpickler(stream, encoding=encoding).load()
    except DataVerificationError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataVerificationError(f"not a valid data pickle: {exc}") from exc
