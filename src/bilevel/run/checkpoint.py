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

A lost or unreadable manifest is rebuilt from the ``step-*.pt`` files (each is loaded with
``weights_only=True`` and must name its own step) instead of starting the run again. Half-written
temp files (``.*.tmp-PID``) are removed only by :meth:`CheckpointStore.clean_temps`, which the
run directory calls once it holds the lock: a process merely opening the directory must not
delete the half-written checkpoint of the live run that holds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bilevel.errors import BilevelError, CheckpointError
from bilevel.run.safeio import write_atomic as _write_atomic

MANIFEST = "manifest.json"
_STEP_FILE = re.compile(r"^step-(\d{8,})\.pt$")


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

    def clean_temps(self) -> None:
        """Delete temp files left by a crash mid-write (never valid). Call only while holding
        the run's lock: a live writer's temp file looks the same."""
        for stale in self.directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)

    def entries(self) -> list[Entry]:
        """Manifest rows, oldest first (empty when nothing was ever saved).

        A missing or unreadable manifest is rebuilt from the step files (see
        :meth:`recover`).

        Raises:
            CheckpointError: if the manifest cannot be read and no step file verifies.
        """
        path = self.directory / MANIFEST
        if not path.exists():
            return self.recover(f"{path} is missing") if self._step_files() else []
        try:
            rows = json.loads(path.read_text())["checkpoints"]
            return [Entry(**row) for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"{path}: unreadable checkpoint manifest ({exc})"
            if not self._step_files():
                raise CheckpointError(problem) from None
            return self.recover(problem)

    def _step_files(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.directory.iterdir():
            m = _STEP_FILE.match(p.name)
            if m and p.is_file() and not p.is_symlink():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def recover(self, problem: str) -> list[Entry]:
        """Rebuild the manifest from the step files that load (``weights_only=True``) and
        whose payload, when it records a step, records the one in its name; report on stderr.

        Raises:
            CheckpointError: if no step file passes.
        """
        entries, rejected = [], []
        for step, p in self._step_files():
            data = p.read_bytes()
            try:
                payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as exc:  # refused or malformed: not a checkpoint we wrote
                rejected.append(f"{p.name}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                continue
            if not isinstance(payload, dict) or payload.get("step", step) != step:
                rejected.append(f"{p.name}: does not hold the checkpoint of step {step}")
                continue
            entries.append(Entry(p.name, step, hashlib.sha256(data).hexdigest(), len(data)))
        if not entries:
            raise CheckpointError(f"{problem}, and no step file could be recovered:\n  "
                                  + "\n  ".join(rejected))
        manifest = {"format": 1, "checkpoints": [e.__dict__ for e in entries]}
        _write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        print(f"{problem}: rebuilt it from {len(entries)} step file(s) "
              f"(steps {', '.join(str(e.step) for e in entries)})"
              + (f"; rejected {'; '.join(rejected)}" if rejected else ""), file=sys.stderr)
        return entries

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
        self, *, report: Callable[[str], None] = print,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Entry, dict[str, Any]] | None:
        """The newest checkpoint that verifies; ``report`` is told about each one skipped.

        ``check`` may reject a loaded payload (raising :class:`CheckpointError`, e.g. for a
        missing key); the previous checkpoint is tried then, as for a corrupt file.

        Returns:
            ``None`` when no checkpoint was ever written.

        Raises:
            CheckpointError: when checkpoints exist but none is valid (exit code 4).
        """
        entries = self.entries()
        problems = []
        for entry in reversed(entries):
            try:
                payload = self.load(entry)
                if check is not None:
                    check(payload)
                return entry, payload
            except CheckpointError as exc:
                problems.append(str(exc))
                report(f"skipping checkpoint: {exc}")
        if not entries:
            return None
        raise CheckpointError("no valid checkpoint:\n  " + "\n  ".join(problems))
