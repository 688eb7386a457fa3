"""Checkpoints that survive crashes and full disks, and are verified before loading.

Layout of ``RUN_DIR/checkpoints/``::

    step-00000050.pt      torch.save of the payload (a dict of tensors and plain values)
    step-00000100.pt
    manifest.json         {"format": 1, "checkpoints": [{"file", "step", "sha256", "bytes"}]}

A write goes to a hidden temp file, is fsynced and renamed into place, then the manifest is
rewritten the same way; only then are checkpoints beyond ``keep_last`` deleted. A crash at any
point leaves the previous manifest and every checkpoint it lists intact. Loading verifies the
sha256 from the manifest (``torch.load`` does not notice a flipped byte inside a tensor) and
uses ``torch.load(weights_only=True)``, so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bilevel.errors import BilevelError, CheckpointError
from bilevel.run.faults import kill_point

MANIFEST = "manifest.json"


class CheckpointWriteError(BilevelError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""

    exit_code = 1


@dataclass(frozen=True)
class Entry:
    """One manifest row."""

    file: str
    step: int
    sha256: str
    bytes: int


def _write_atomic(path: Path, data: bytes, *, fault: str | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
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
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointStore:
    """The checkpoints of one run directory.

    Args:
        directory: ``RUN_DIR/checkpoints`` (created if missing).
        keep_last: how many checkpoints to keep; older ones are deleted after each save.
    """

    def __init__(self, directory: Path, *, keep_last: int = 3) -> None:
        self.directory = directory
        self.keep_last = keep_last
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.tmp-*"):  # left by a crash mid-write; never valid
            stale.unlink(missing_ok=True)

    def entries(self) -> list[Entry]:
        """Manifest rows, oldest first (empty when nothing was ever saved).

        Raises:
            CheckpointError: if the manifest exists but cannot be read.
        """
        path = self.directory / MANIFEST
        if not path.exists():
            return []
        try:
            rows = json.loads(path.read_text())["checkpoints"]
            return [Entry(**row) for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint manifest ({exc})") from None

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        """Write ``payload`` as the checkpoint of ``step`` (replacing one of the same step).

        Raises:
            CheckpointWriteError: naming the path and errno; the previous state is intact.
        """
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        path = self.directory / f"step-{step:08d}.pt"
        entry = Entry(path.name, step, hashlib.sha256(data).hexdigest(), len(data))
        before = self.entries()
        old = [e for e in before if e.step < step]  # later ones belong to an abandoned future
        keep = [*old, entry][-self.keep_last :]
        manifest = {"format": 1, "checkpoints": [e.__dict__ for e in keep]}
        try:
            _write_atomic(path, data, fault="checkpoint_write")
            _write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as exc:
            if path.name not in {e.file for e in before}:
                path.unlink(missing_ok=True)
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: [Errno {exc.errno}] {exc.strerror}; "
                "the previous checkpoint is intact (free disk space, then `bilevel resume`)"
            ) from exc
        kept = {e.file for e in keep}
        for gone in before:
            if gone.file not in kept:
                (self.directory / gone.file).unlink(missing_ok=True)
        return path

    def load(self, entry: Entry) -> dict[str, Any]:
        """Verify ``entry``'s sha256, then load it with ``weights_only=True``.

        Raises:
            CheckpointError: if missing, truncated, modified or not loadable.
        """
        path = self.directory / entry.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
        if len(data) != entry.bytes:
            raise CheckpointError(
                f"{path}: truncated ({len(data)} bytes, manifest says {entry.bytes})"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise CheckpointError(f"{path}: sha256 mismatch (file modified or corrupted)")
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # unpickling refused or malformed archive
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): "
                                  f"{str(exc).splitlines()[0]}") from None

    def load_latest(
        self, *, report: Callable[[str], None] = print
    ) -> tuple[Entry, dict[str, Any]] | None:
        """The newest checkpoint that verifies; ``report`` is told about each one skipped.

        Returns:
            ``None`` when no checkpoint was ever written.

        Raises:
            CheckpointError: when checkpoints exist but none is valid (exit code 4).
        """
        entries = self.entries()
        problems = []
        for entry in reversed(entries):
            try:
                return entry, self.load(entry)
            except CheckpointError as exc:
                problems.append(str(exc))
                report(f"skipping checkpoint: {exc}")
        if not entries:
            return None
        raise CheckpointError("no valid checkpoint:\n  " + "\n  ".join(problems))
