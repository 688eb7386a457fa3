"""File writes of a run directory that survive crashes and do not follow symbolic links.

A run directory may be shared or copied around, and a link planted in it (``metrics.jsonl ->
~/.bashrc``) must not make bilevel truncate or append to the link's target. So every file of a
run is either

* replaced atomically (:func:`write_atomic`): written to a fresh temp file created with
  ``O_EXCL | O_NOFOLLOW``, fsynced, then renamed over the target, which replaces a link
  itself rather than writing through it; or
* opened with ``O_NOFOLLOW`` (:func:`open_nofollow`), which refuses a link with
  :class:`RunFileError`; or
* created exclusively (:func:`create_exclusive`), complete from its first moment.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import IO, Any

from bilevel.errors import BilevelError
from bilevel.run.faults import kill_point

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class RunFileError(BilevelError):
    """A file of a run directory is a symbolic link (or otherwise not a regular file)."""

    exit_code = 2


def _link_refused(path: Path) -> RunFileError:
    return RunFileError(f"{path} is a symbolic link; bilevel does not follow links in a run "
                        "directory (replace it with a regular file, or use another --out)")


def open_nofollow(path: Path, flags: int, mode: str, **kwargs: Any) -> IO[Any]:
    """``open`` with ``os.open`` ``flags`` plus ``O_NOFOLLOW``; ``mode`` and ``kwargs`` go to
    :func:`os.fdopen`.

    Raises:
        RunFileError: if ``path`` is a symbolic link.
    """
    try:
        fd = os.open(path, flags | NOFOLLOW | CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_refused(path) from None
        raise
    return os.fdopen(fd, mode, **kwargs)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, fault: str | None = None) -> None:
    """Replace ``path`` by ``data`` atomically (temp file, fsync, rename, fsync the folder).

    ``fault`` names a :mod:`bilevel.run.faults` point reached half-way through the write.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # ours, from an earlier attempt of this same process id
    try:
        with open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if fault:
                f.flush()
                kill_point(fault)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; ``False`` if it did.

    The content is written to a temp file first and hard-linked into place, so that no
    reader ever sees ``path`` half-written; where hard links are unsupported, an
    ``O_EXCL`` create is used instead.
    """
    tmp = path.with_name(f".{path.name}.claim-{os.getpid()}")
    try:
        write_atomic(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            try:
                f = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "wb")
            except FileExistsError:
                return False
            with f:
                f.write(data)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
