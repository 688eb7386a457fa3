"""How a run stops on a signal: SIGINT (Ctrl-C) and SIGTERM both ask for a clean stop.

The first SIGINT or SIGTERM only sets a flag; the run finishes its step, writes a checkpoint
and exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) and status
``interrupted``. A second one stops at once, without a checkpoint, by raising
:class:`StopNow` (a ``KeyboardInterrupt``, so no ``except Exception`` swallows it); the run is
still recorded ``interrupted``, since its last checkpoint is intact.

SIGXFSZ (a file grew past ``RLIMIT_FSIZE``) is ignored while a run is active, so that the
write fails with ``EFBIG`` and the run records ``failed`` and releases its lock, instead of
the process dying with status ``running``.

While a run is active, an ``OSError`` that kills a background thread (TensorBoard's writer
thread on a full disk or past the size limit) is reported in one line instead of a traceback;
the run itself then fails on its next write.

Handlers are installed only from the main thread (Python allows no other).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from bilevel.errors import BilevelError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BilevelError):
    """SIGINT or SIGTERM: the run stopped after writing a clean checkpoint.

    Its exit code is ``128 + signum``: 130 for Ctrl-C, 143 for SIGTERM.
    """

    exit_code = 130

    def __init__(self, message: str, *, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.exit_code = 128 + int(signum)


class StopSignals:
    """Install the stop handlers for the lifetime of a ``with`` block."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._old_hook: Any = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as the first signal would."""
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
            if hasattr(signal, "SIGXFSZ"):
                self._old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            self._old_hook = threading.excepthook
            threading.excepthook = self._thread_died
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self._old_hook is not None:
            threading.excepthook = self._old_hook
            self._old_hook = None

    def _thread_died(self, args: Any) -> None:
        if isinstance(args.exc_value, OSError):
            name = args.thread.name if args.thread is not None else "a thread"
            print(f"warning: {name} stopped: {args.exc_value}", file=sys.stderr)
        else:
            (self._old_hook or threading.__excepthook__)(args)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: stop now, without a checkpoint
            raise StopNow(signum)
        self.signum = signum
        key = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              f"({key} again to stop at once)", file=sys.stderr)
