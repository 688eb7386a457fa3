"""A run-directory lock with a heartbeat: one live process per run directory.

The lock file holds ``{"pid", "host", "started"}``; a background thread touches it every
``heartbeat_s`` seconds. Another process finding the lock takes it over when it is stale (its
process is dead on this host, or its heartbeat is older than ``stale_after_s``), and refuses
otherwise, saying which process holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from bilevel.errors import BilevelError


class RunLockedError(BilevelError):
    """The run directory is in use by a live process."""

    exit_code = 2


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 probes, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory, kept alive by a heartbeat thread.

    Args:
        path: the lock file (``RUN_DIR/lock``).
        heartbeat_s: seconds between heartbeats.
        stale_after_s: a lock whose heartbeat is older than this is taken over.
    """

    def __init__(self, path: Path, *, heartbeat_s: float = 2.0, stale_after_s: float = 30.0):
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> tuple[dict[str, object], float] | None:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return info, self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except ValueError:  # half-written by a process killed while creating it
            return {}, self.path.stat().st_mtime

    def _stale(self, info: dict[str, object], mtime: float) -> bool:
        if time.time() - mtime > self.stale_after_s:
            return True
        pid = info.get("pid")
        same_host = info.get("host") == socket.gethostname()
        return same_host and isinstance(pid, int) and not pid_alive(pid)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one.

        Raises:
            RunLockedError: if a live process holds it.
        """
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._holder()
                if held is None:
                    continue
                info, mtime = held
                if not self._stale(info, mtime):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by process {info.get('pid')} on "
                        f"{info.get('host')} (heartbeat {time.time() - mtime:.0f} s ago); "
                        "wait for it to finish or stop it first"
                    ) from None
                # Renaming is atomic: of two processes taking over, only one succeeds.
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, self.path.with_name(f"{self.path.name}.stale"))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._start_heartbeat()
            return
        raise RunLockedError(f"could not take the lock {self.path}; another process races for it")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="bilevel-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
