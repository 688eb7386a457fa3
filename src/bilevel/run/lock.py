"""A run-directory lock: one live process per run directory, released when that process dies.

The lock is an ``flock`` on ``RUN_DIR/lock``: the kernel drops it the moment its process
exits, however it exits (``kill -9`` included), so a dead holder never blocks a resume and
nothing waits for a timeout. The file holds ``{"pid", "host", "boot_id", "proc_start",
"started"}`` only to name the holder in the refusal message, and a heartbeat thread touches it
every ``heartbeat_s`` seconds.

Two cases do not trust ``flock`` alone:

* the file names a process on *another host* whose heartbeat is younger than
  ``stale_after_s``: some network file systems keep ``flock`` local to each host, so the
  lock is refused then;
* ``flock`` is not supported by the file system (``ENOLCK``, ``EOPNOTSUPP``): the holder is
  judged from the file: on this host and boot, alive when its pid exists *and* has the same
  start time (a recycled pid is not mistaken for the holder); elsewhere, alive while its
  heartbeat is fresh.

The lock file is opened with ``O_NOFOLLOW``: a symlink planted as ``lock`` is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

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


def boot_id() -> str | None:
    """This boot's id (Linux), so that a lock from before a reboot is known to be dead."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), ``None`` when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def holder_alive(info: dict[str, Any], mtime: float, *, stale_after_s: float) -> bool:
    """Judge a lock holder from its file alone (used where ``flock`` is unavailable)."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int):
        return time.time() - mtime <= stale_after_s
    if info.get("boot_id") is not None and info.get("boot_id") != boot_id():
        return False  # this host rebooted since
    if not pid_alive(pid):
        return False
    started = info.get("proc_start")
    return started is None or process_start(pid) in (None, started)


class RunLock:
    """Exclusive lock on a run directory (``flock``), with a heartbeat for other hosts.

    Args:
        path: the lock file (``RUN_DIR/lock``).
        heartbeat_s: seconds between heartbeats.
        stale_after_s: a lock of another host whose heartbeat is older than this is free.
    """

    def __init__(self, path: Path, *, heartbeat_s: float = 2.0, stale_after_s: float = 30.0):
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, fd: int) -> tuple[dict[str, Any], float]:
        try:
            data = os.pread(fd, 4096, 0)
            info = json.loads(data or b"{}")
            return (info if isinstance(info, dict) else {}), os.fstat(fd).st_mtime
        except (OSError, ValueError):  # empty or half-written (disk full at creation)
            return {}, 0.0

    def _refuse(self, info: dict[str, Any], mtime: float) -> RunLockedError:
        who = (f"process {info['pid']} on {info.get('host')}" if "pid" in info
               else "another process (its lock file names none)")
        beat = f" (heartbeat {time.time() - mtime:.0f} s ago)" if mtime else ""
        return RunLockedError(f"{self.path.parent} is in use by {who}{beat}; wait for it to "
                              "finish or stop it first")

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunLockedError(f"{self.path} is a symbolic link; bilevel does not follow "
                                     "links in a run directory (remove it)") from None
            raise

    def acquire(self) -> None:
        """Take the lock; a lock left by a dead process is taken over at once.

        Raises:
            RunLockedError: if a live process holds it.
        """
        for _ in range(10):
            fd = self._open()
            try:
                flock_ok = self._flock(fd)
                info, mtime = self._read(fd)
                if not flock_ok:
                    raise self._refuse(info, mtime)
                if self._other_host_alive(info, mtime):
                    raise self._refuse(info, mtime)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the holder released (unlinked) it between our open and flock
                    os.close(fd)
                    continue
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd = fd
            self._write_info(fd)
            self._start_heartbeat()
            return
        raise RunLockedError(f"could not take the lock {self.path}; another process races for it")

    def _flock(self, fd: int) -> bool:
        """True when this process now holds the flock (or flock is unsupported and the file
        names no live holder)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        info, mtime = self._read(fd)
        return not holder_alive(info, mtime, stale_after_s=self.stale_after_s)

    def _other_host_alive(self, info: dict[str, Any], mtime: float) -> bool:
        host = info.get("host")
        return (host is not None and host != socket.gethostname()
                and time.time() - mtime <= self.stale_after_s)

    def _write_info(self, fd: int) -> None:
        pid = os.getpid()
        me = {"pid": pid, "host": socket.gethostname(), "boot_id": boot_id(),
              "proc_start": process_start(pid), "started": time.time()}
        data = json.dumps(me).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            # Disk full: the flock is held all the same; the file just cannot name us.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="bilevel-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            fd = self._fd
            if fd is None:
                return
            try:
                os.utime(fd)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat, remove the lock file, then drop the flock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            # Unlink while still holding the flock: a process that opened the old file
            # meanwhile sees that its inode is no longer ``lock`` and tries again.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

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
