"""The run directory: what a recipe writes to, and what ``bilevel resume`` continues from.

Layout::

    RUN_DIR/
      config.yaml      resolved config (every default filled in); edit + resume is checked
      run.json         {"recipe", "config", "config_hash", "status", "created"}
      metrics.jsonl    one JSON object per log call (see bilevel.run.metrics)
      tb/              TensorBoard events (when tensorboard is installed)
      checkpoints/     step-*.pt + manifest.json (see bilevel.run.checkpoint)
      summary.json     the metrics ``run()`` returned, written when the run finishes
      lock             held while a process works in the directory

A recipe uses it like this (every step is checkpointed when due or when Ctrl-C was pressed)::

    start = 0
    if (ckpt := run_dir.restore()) is not None:     # also restores every RNG
        load(ckpt.state); start = ckpt.step
    for step in run_dir.steps(start, config.run.max_steps):
        ...                                         # one step
        run_dir.log(step, {"train/loss": loss})
        run_dir.checkpoint(step, state_dict())      # saves every checkpoint.every steps
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from bilevel.errors import BilevelError, CheckpointError, ConfigError
from bilevel.run.checkpoint import CheckpointStore
from bilevel.run.config import changed_keys, config_hash
from bilevel.run.faults import kill_point
from bilevel.run.lock import RunLock
from bilevel.run.metrics import MetricsWriter, truncate_metrics
from bilevel.run.progress import progress_bar, progress_enabled
from bilevel.run.schema import RESUMABLE_CHANGES, CheckpointConfig, LoggingConfig
from bilevel.run.seeding import capture_rng, restore_rng
from bilevel.run.yamlio import dump_yaml


class RunInterrupted(BilevelError):
    """Ctrl-C (SIGINT): the run stopped after writing a clean checkpoint."""

    exit_code = 130


@dataclass(frozen=True)
class Checkpoint:
    """What :meth:`RunDir.restore` returns: the step reached and the recipe's state."""

    step: int
    state: dict[str, Any]


class RunDir:
    """One run's directory; use :meth:`create` or :meth:`open`, then ``with run_dir:``."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = path
        self.recipe: str = info["recipe"]
        self.config: dict[str, Any] = info["config"]
        self.config_hash: str = info["config_hash"]
        self._info = info
        self.logging = LoggingConfig(**self.config.get("logging", {}))
        self.checkpointing = CheckpointConfig(**self.config.get("checkpoint", {}))
        self._store = CheckpointStore(path / "checkpoints", keep_last=self.checkpointing.keep_last)
        self._metrics: MetricsWriter | None = None
        self._lock = RunLock(path / "lock")
        self._stop = False
        self._old_handler: Any = None
        self._t0 = time.time()

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any], *, recipe: str) -> RunDir:
        """Make a new run directory holding the resolved ``config`` of ``recipe``.

        Raises:
            ConfigError: if ``path`` exists and is not empty.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"--out {path}: directory exists and is not empty; choose "
                              f"another, or continue it with `bilevel resume {path}`")
        path.mkdir(parents=True, exist_ok=True)
        resolved = {"recipe": recipe, **config}
        info = {"recipe": recipe, "config": resolved, "config_hash": config_hash(resolved),
                "status": "created", "created": time.time()}
        run_dir = cls(path, info)
        run_dir._write_info()
        return run_dir

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory (for ``resume`` or ``report``).

        Raises:
            ConfigError: if ``path`` is not a run directory.
        """
        path = Path(path)
        try:
            info = json.loads((path / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not a bilevel run directory (run.json: {exc})") from None
        return cls(path, info)

    def _write_info(self) -> None:
        (self.path / "config.yaml").write_text(dump_yaml(self.config))
        tmp = self.path / ".run.json.tmp"
        tmp.write_text(json.dumps(self._info, indent=1))
        tmp.replace(self.path / "run.json")

    def update_config(self, config: Mapping[str, Any], *, allow_change: bool = False) -> None:
        """Accept a (possibly edited) config for resuming; only harmless keys may change.

        Raises:
            ConfigError: listing every changed key, when a key that alters the run changed
                (or any key changed without ``allow_change``).
        """
        new = dict(config)
        changes = changed_keys(self.config, new)
        if not changes:
            return
        fixed = [c for c in changes if not c.startswith(RESUMABLE_CHANGES)]
        if fixed or not allow_change:
            hint = (" (--allow-config-change lets only these change: "
                    f"{', '.join(RESUMABLE_CHANGES)})")
            raise ConfigError("config changed since the run started; refusing to resume:\n  "
                              + "\n  ".join(changes) + hint)
        self.config, self.config_hash = new, config_hash(new)
        self._info.update(config=new, config_hash=self.config_hash)
        self.logging = LoggingConfig(**new.get("logging", {}))
        self.checkpointing = CheckpointConfig(**new.get("checkpoint", {}))
        self._store.keep_last = self.checkpointing.keep_last
        self._write_info()

    # -- lifetime -------------------------------------------------------------------------

    def __enter__(self) -> RunDir:
        self._lock.acquire()
        self.set_status("running")
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
            self._old_handler = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if exc_type is not None:
            self.set_status("interrupted" if exc_type is RunInterrupted else "failed")
        self._lock.release()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._stop:  # second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop = True
        print("\ninterrupt: finishing this step and writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    def set_status(self, status: str) -> None:
        """Record ``created`` / ``running`` / ``interrupted`` / ``failed`` / ``finished``."""
        self._info["status"] = status
        self._write_info()

    @property
    def stop_requested(self) -> bool:
        """True once Ctrl-C was pressed; the next :meth:`checkpoint` saves and stops."""
        return self._stop

    def request_stop(self) -> None:
        """Ask the run to stop after its next checkpoint (what Ctrl-C does)."""
        self._stop = True

    # -- recipe API -----------------------------------------------------------------------

    def _writer(self, purge_step: int | None = None) -> MetricsWriter:
        if self._metrics is None:
            tb = self.path / "tb" if self.logging.tensorboard else None
            self._metrics = MetricsWriter(self.path / "metrics.jsonl", tensorboard_dir=tb,
                                          purge_step=purge_step, t0=self._t0)
        return self._metrics

    def restore(self) -> Checkpoint | None:
        """Load the newest valid checkpoint, restore all RNG states and cut the metrics back.

        Call it after building the model (so that the restored RNG state wins). Skipped
        (corrupt) checkpoints are reported on stderr and logged as ``checkpoint_skipped``.

        Returns:
            ``None`` for a fresh run (also when no checkpoint was ever written).

        Raises:
            CheckpointError: checkpoints exist but none is valid (exit code 4).
            ConfigError: the checkpoint was written under a config that changed.
        """
        skipped: list[str] = []

        def report(msg: str) -> None:
            skipped.append(msg)
            print(msg, file=sys.stderr)

        found = self._store.load_latest(report=report)
        if found is None:
            truncate_metrics(self.path / "metrics.jsonl", 0)
            return None
        entry, payload = found
        if payload.get("format") != 1 or "state" not in payload:
            raise CheckpointError(f"{self._store.directory / entry.file}: not a bilevel checkpoint")
        changes = changed_keys(payload["config"], self.config)
        bad = [c for c in changes if not c.startswith(RESUMABLE_CHANGES)]
        if bad:
            raise ConfigError("config differs from the checkpoint's:\n  " + "\n  ".join(bad))
        restore_rng(payload["rng"])
        truncate_metrics(self.path / "metrics.jsonl", payload["metrics_offset"])
        self._t0 = time.time() - payload["wall"]
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        writer = self._writer(purge_step=entry.step + 1)
        for msg in skipped:
            writer.write(entry.step, {"event": "checkpoint_skipped", "detail": msg})
        return Checkpoint(step=entry.step, state=payload["state"])

    def steps(self, start: int, stop: int, *, desc: str | None = None) -> Iterator[int]:
        """Yield the step numbers ``start + 1 .. stop``, with a progress bar on a terminal.

        Raises:
            RunInterrupted: if Ctrl-C arrived and the recipe did not checkpoint that step.
        """
        enabled = progress_enabled(self.logging.progress)
        with progress_bar(total=stop, initial=start, desc=desc or self.recipe,
                          enabled=enabled) as bar:
            for step in range(start + 1, stop + 1):
                if self._stop:
                    raise RunInterrupted(f"interrupted at step {step - 1} without a checkpoint")
                yield step
                bar.update(1)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Append one metrics record (``step``, ``wall`` and ``values``) to metrics.jsonl."""
        self._writer().write(step, values)

    def event(self, step: int, kind: str, **info: Any) -> None:
        """Log an event record ``{"event": kind, **info}`` and print it on stderr."""
        self._writer().write(step, {"event": kind, **info})
        print(f"step {step}: {kind} {info}", file=sys.stderr)

    def checkpoint(self, step: int, state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save ``state`` (+ RNG states) if due (every ``checkpoint.every`` steps), forced,
        or Ctrl-C was pressed. Returns whether it saved.

        Raises:
            RunInterrupted: after saving, when Ctrl-C was pressed (exit code 130).
            CheckpointWriteError: the disk is full; the previous checkpoint is intact.
        """
        due = force or self._stop or step % self.checkpointing.every == 0
        if not due:
            return False
        offset = self._writer().sync()
        payload = {"format": 1, "step": step, "state": dict(state), "rng": capture_rng(),
                   "metrics_offset": offset, "wall": time.time() - self._t0,
                   "config": self.config, "config_hash": self.config_hash}
        self._store.save(step, payload)
        kill_point("after_checkpoint")
        if self._stop:
            raise RunInterrupted(f"interrupted at step {step}; checkpoint written; "
                                 f"continue with: bilevel resume {self.path}")
        return True

    def finish(self, summary: Mapping[str, float]) -> None:
        """Write summary.json and mark the run finished."""
        if self._metrics is not None:
            self._metrics.sync()
        (self.path / "summary.json").write_text(json.dumps(dict(summary), indent=1))
        self.set_status("finished")
