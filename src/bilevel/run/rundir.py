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

Guarantees (see docs/runs.md): :meth:`RunDir.create` claims its directory atomically (of two
processes creating the same run, one gets a clear error); nothing in the directory is
modified before the lock is held (a refused ``resume`` leaves the live run alone); files are
replaced atomically or opened with ``O_NOFOLLOW`` (:mod:`bilevel.run.safeio`); SIGINT and
SIGTERM checkpoint and stop (:mod:`bilevel.run.signals`).

A recipe uses it like this (every step is checkpointed when due or when Ctrl-C was pressed)::

    state = RunState(model=model, opt=opt, sampler=sampler)   # see bilevel.run.state
    start = run_dir.resume(state)                   # also restores every RNG; 0 when fresh
    for step in run_dir.steps(start, config.run.max_steps):
        ...                                         # one step
        run_dir.log(step, {"train/loss": loss})
        run_dir.checkpoint(step, state)             # saves every checkpoint.every steps
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bilevel.errors import CheckpointError, ConfigError
from bilevel.run.checkpoint import CheckpointStore
from bilevel.run.config import changed_keys, config_hash
from bilevel.run.faults import kill_point
from bilevel.run.lock import RunLock
from bilevel.run.metrics import MetricsWriter, truncate_metrics
from bilevel.run.progress import progress_bar, progress_enabled
from bilevel.run.safeio import create_exclusive, write_atomic
from bilevel.run.schema import RESUMABLE_CHANGES, CheckpointConfig, LoggingConfig
from bilevel.run.seeding import capture_rng, restore_rng
from bilevel.run.signals import RunInterrupted, StopSignals
from bilevel.run.state import RunState
from bilevel.run.yamlio import dump_yaml

__all__ = ["Checkpoint", "RunDir", "RunInterrupted"]
PAYLOAD_KEYS = ("state", "rng", "metrics_offset", "wall", "config")  # of a checkpoint


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
        self._signals = StopSignals()
        self._saved: int | None = None  # the step of the last checkpoint written
        self._t0 = time.time()

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any], *, recipe: str) -> RunDir:
        """Make a new run directory holding the resolved ``config`` of ``recipe``.

        The directory is claimed atomically (``mkdir``, then ``run.json`` linked into place,
        which fails if it exists): of two processes creating the same run, one gets the error.

        Raises:
            ConfigError: if ``path`` exists and is not an empty directory, or cannot be
                created (read-only file system, a regular file in the way, no permission).
        """
        path = Path(path)
        resolved = {"recipe": recipe, **config}
        info = {"recipe": recipe, "config": resolved, "config_hash": config_hash(resolved),
                "status": "created", "created": time.time()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
            except FileExistsError:
                if path.is_symlink() or not path.is_dir():
                    raise ConfigError(f"--out {path}: exists and is not a directory; choose "
                                      "another path") from None
                if any(path.iterdir()):
                    raise _not_empty(path) from None
            run_dir = cls(path, info)
            if not create_exclusive(path / "run.json", json.dumps(info, indent=1).encode()):
                raise _not_empty(path)  # another process claimed it a moment ago
            run_dir._write_info()
        except OSError as exc:
            raise ConfigError(f"--out {path}: cannot create the run directory "
                              f"({exc.strerror or exc}); choose a writable path") from None
        return run_dir

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory (for ``resume`` or ``report``). Nothing in it is
        changed until ``with run_dir:`` holds the lock.

        Raises:
            ConfigError: if ``path`` is not a run directory.
        """
        path = Path(path)
        try:
            info = json.loads((path / "run.json").read_text())
            if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
                raise ValueError("not a mapping with a config")
            return cls(path, info)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a bilevel run directory (run.json: {exc})") from None

    def _write_info(self) -> None:
        write_atomic(self.path / "config.yaml", dump_yaml(self.config).encode())
        write_atomic(self.path / "run.json", json.dumps(self._info, indent=1).encode())

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
        # Written by __enter__, once the lock is held (this process may yet be refused).

    # -- lifetime -------------------------------------------------------------------------

    def __enter__(self) -> RunDir:
        self._lock.acquire()
        try:
            self._store.clean_temps()  # only now: a live writer's temp files look the same
            self._signals.__enter__()
            self.set_status("running")
        except BaseException:
            self._signals.__exit__()
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._signals.__exit__()
            if self._metrics is not None:
                with contextlib.suppress(OSError):  # e.g. EFBIG: the status still gets written
                    self._metrics.close()
                self._metrics = None
            if exc_type is not None:
                stopped = issubclass(exc_type, (RunInterrupted, KeyboardInterrupt))
                self.set_status("interrupted" if stopped else "failed")
        finally:
            self._lock.release()

    def set_status(self, status: str) -> None:
        """Record ``created`` / ``running`` / ``interrupted`` / ``failed`` / ``finished``."""
        self._info["status"] = status
        self._write_info()

    @property
    def stop_requested(self) -> bool:
        """True once Ctrl-C or SIGTERM arrived; the next :meth:`checkpoint` saves and stops."""
        return self._signals.requested

    def request_stop(self) -> None:
        """Ask the run to stop after its next checkpoint (what Ctrl-C does)."""
        self._signals.request()

    def _interrupted(self, message: str) -> RunInterrupted:
        return RunInterrupted(message, signum=self._signals.signum or 2)

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

        found = self._store.load_latest(report=report, check=self._check_payload)
        if found is None:
            truncate_metrics(self.path / "metrics.jsonl", 0)
            return None
        entry, payload = found
        changes = changed_keys(payload["config"], self.config)
        bad = [c for c in changes if not c.startswith(RESUMABLE_CHANGES)]
        if bad:
            raise ConfigError("config differs from the checkpoint's:\n  " + "\n  ".join(bad))
        restore_rng(payload["rng"])
        lost = truncate_metrics(self.path / "metrics.jsonl", payload["metrics_offset"])
        if lost is not None:
            report(lost)
        self._t0 = time.time() - payload["wall"]
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        writer = self._writer(purge_step=entry.step + 1)
        for msg in skipped:
            kind = "metrics_lost" if msg is lost else "checkpoint_skipped"
            writer.write(entry.step, {"event": kind, "detail": msg})
        return Checkpoint(step=entry.step, state=payload["state"])

    def resume(self, state: RunState, *, save_start: bool = False) -> int:
        """Restore the newest valid checkpoint into ``state`` (and every RNG, as
        :meth:`restore`); return the step to continue from, 0 for a fresh run.

        Args:
            save_start: on a fresh run, checkpoint step 0 at once: a resume point before a
                long first step, and a target for ``nan_policy: rollback``.

        Raises:
            CheckpointError: as :meth:`restore`; also when the checkpoint's keys are not
                ``state``'s (a checkpoint of another recipe version).
            ConfigError: the checkpoint was written under a config that changed.
        """
        ckpt = self.restore()
        if ckpt is not None:
            state.load_state_dict(ckpt.state)
            return ckpt.step
        if save_start:
            self.checkpoint(0, state, force=True)
        return 0

    def _check_payload(self, payload: dict[str, Any]) -> None:
        """Reject (so that the previous checkpoint is tried) a payload lacking a key."""
        missing = [k for k in PAYLOAD_KEYS if k not in payload]
        if payload.get("format") != 1 or missing:
            raise CheckpointError("not a complete bilevel checkpoint (format "
                                  f"{payload.get('format')!r}, missing: {', '.join(missing)})")

    def steps(self, start: int, stop: int, *, desc: str | None = None) -> Iterator[int]:
        """Yield the step numbers ``start + 1 .. stop``, with a progress bar on a terminal.

        Raises:
            RunInterrupted: if Ctrl-C arrived and the recipe did not checkpoint that step.
            ConfigError: if ``start`` is past ``stop`` (``run.max_steps`` lowered below the
                checkpoint on resume): the run would otherwise report finished past its end.
        """
        if start > stop:
            raise ConfigError(f"the run's checkpoint is at step {start}, past its last step "
                              f"{stop} (run.max_steps lowered?); resume with a run.max_steps "
                              "that reaches the checkpoint (--set ... --allow-config-change)")
        enabled = progress_enabled(self.logging.progress)
        with progress_bar(total=stop, initial=start, desc=desc or self.recipe,
                          enabled=enabled) as bar:
            for step in range(start + 1, stop + 1):
                if self._signals.requested:
                    done = ("checkpoint written; continue with: bilevel resume "
                            f"{self.path}" if self._saved == step - 1 else "without a checkpoint")
                    raise self._interrupted(f"interrupted at step {step - 1}; {done}")
                yield step
                bar.update(1)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Append one metrics record (``step``, ``wall`` and ``values``) to metrics.jsonl."""
        self._writer().write(step, values)

    def event(self, step: int, kind: str, **info: Any) -> None:
        """Log an event record ``{"event": kind, **info}`` and print it on stderr."""
        self._writer().write(step, {"event": kind, **info})
        print(f"step {step}: {kind} {info}", file=sys.stderr)

    def checkpoint(self, step: int, state: RunState | Mapping[str, Any], *,
                   force: bool = False) -> bool:
        """Save ``state`` (+ RNG states) if due (every ``checkpoint.every`` steps), forced,
        or Ctrl-C was pressed. Returns whether it saved. A :class:`RunState` is read only
        then; a mapping is the saved state itself.

        Raises:
            RunInterrupted: after saving, when Ctrl-C was pressed (exit code 130).
            CheckpointWriteError: the disk is full; the previous checkpoint is intact.
        """
        stop = self._signals.requested
        due = force or stop or step % self.checkpointing.every == 0
        if not due:
            return False
        offset = self._writer().sync()
        saved = state.state_dict() if isinstance(state, RunState) else dict(state)
        payload = {"format": 1, "step": step, "state": saved, "rng": capture_rng(),
                   "metrics_offset": offset, "wall": time.time() - self._t0,
                   "config": self.config, "config_hash": self.config_hash}
        self._store.save(step, payload)
        self._saved = step
        kill_point("after_checkpoint")
        if stop:
            raise self._interrupted(f"interrupted at step {step}; checkpoint written; "
                                    f"continue with: bilevel resume {self.path}")
        return True

    def finish(self, summary: Mapping[str, float]) -> None:
        """Write summary.json and mark the run finished."""
        if self._metrics is not None:
            self._metrics.sync()
        write_atomic(self.path / "summary.json", json.dumps(dict(summary), indent=1).encode())
        self.set_status("finished")


def _not_empty(path: Path) -> ConfigError:
    return ConfigError(f"--out {path}: directory exists and is not empty; choose another, or "
                       f"continue it with `bilevel resume {path}`")
