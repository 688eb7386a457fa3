"""Metrics as JSON lines (always) and TensorBoard scalars (when ``tensorboard`` is installed).

``metrics.jsonl`` holds one JSON object per log call: ``{"step": 10, "wall": 1.73,
"train/loss": 0.52, ...}``. Floats are written with ``repr`` precision, so they read back
bit-exact. A process killed mid-write leaves a torn last line, which :func:`read_metrics`
skips. The byte offset of the file is saved in every checkpoint, and a resumed run truncates
the file there, so its metrics are exactly those of an uninterrupted run. A file found
*shorter* than that offset (cut by hand, a restored backup, a disk error) is not appended to
blindly: :func:`truncate_metrics` cuts it back to its last complete line and says which
records were lost, and the run logs that as a ``metrics_lost`` event. The file is opened with
``O_NOFOLLOW``: a symbolic link in its place is refused, never written through.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel.errors import BilevelError
from bilevel.run.safeio import open_nofollow

TB_NOTICE = "note: TensorBoard events not written (install bilevel[tb]); metrics.jsonl has them all"


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Args:
        path: the JSONL file (created if missing, appended to otherwise).
        tensorboard_dir: where to write TensorBoard events; ``None`` disables them.
        purge_step: on resume, TensorBoard discards events logged after this step.
        t0: wall-clock origin of the ``wall`` field (seconds since the run started).
    """

    def __init__(
        self,
        path: Path,
        *,
        tensorboard_dir: Path | None = None,
        purge_step: int | None = None,
        t0: float | None = None,
    ) -> None:
        self.path = path
        self._file = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a",
                                   encoding="utf-8", buffering=1)
        self._t0 = time.time() if t0 is None else t0
        self._tb: Any = None
        if tensorboard_dir is not None:
            self._tb = _tensorboard_writer(tensorboard_dir, purge_step)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """Append one record ``{"step": step, "wall": seconds, **values}``."""
        record = {"step": int(step), "wall": round(time.time() - self._t0, 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "wall") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, global_step=step)

    def sync(self) -> int:
        """Flush and fsync; return the file's size (the offset a checkpoint records)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()
        return self._file.tell()

    def close(self) -> None:
        """Flush and close both sinks."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers; other values pass through."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _tensorboard_writer(directory: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(TB_NOTICE, file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


class MetricsError(BilevelError, ValueError):
    """metrics.jsonl is damaged in a way that loses records."""

    exit_code = 2


def truncate_metrics(path: Path, offset: int) -> str | None:
    """Cut ``metrics.jsonl`` back to ``offset`` bytes (records after a checkpoint).

    When the file is shorter than ``offset`` or would end inside a line, it is cut back to
    its last complete line instead, so that the next record starts a line of its own.

    Returns:
        ``None`` when the file held every record up to ``offset``; otherwise a message
        saying what was lost (the caller logs it).
    """
    try:
        f = open_nofollow(path, os.O_RDWR, "r+b")
    except FileNotFoundError:
        return None if offset == 0 else f"{path} is missing; the records before it are lost"
    with f:
        size = os.fstat(f.fileno()).st_size
        end = min(size, offset)
        f.seek(max(0, end - 65536))
        tail = f.read(end - f.tell())
        problem = None
        if size < offset or (tail and not tail.endswith(b"\n")):
            keep = tail.rfind(b"\n") + 1
            last = _last_step(tail[:keep])
            end = end - len(tail) + keep
            problem = (f"{path} holds {size} bytes but the checkpoint recorded {offset}; it "
                       f"was cut short or modified, so the records "
                       f"{f'after step {last}' if last is not None else 'of this stretch'} up "
                       "to the checkpoint are lost (cut back to its last complete line)")
        if size > end:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return problem


def _last_step(text: bytes) -> int | None:
    for line in reversed(text.split(b"\n")):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl``, skipping a torn last line (with a warning).

    Raises:
        MetricsError: (a ``ValueError``) if a line other than the last is not valid JSON.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise MetricsError(f"{path}:{i + 1}: corrupt metrics line {line[:60]!r}; "
                                   "remove or fix that line") from None
            warnings.warn(f"{path}:{i + 1}: skipped a torn last line", RuntimeWarning,
                          stacklevel=2)
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite-or-not float values of one metric across records that have it."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(int(r["step"]))
            values.append(float(v) if math.isfinite(v) else math.nan)
    return steps, values
