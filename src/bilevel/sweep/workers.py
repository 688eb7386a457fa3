"""Sweep worker processes that do not outlive the sweep that started them.

A ``--parallel`` sweep runs its trials in ``spawn``-ed worker processes. If the sweep itself
is killed (``kill -9``, out of memory, a closed terminal), its workers must not train on for
minutes holding their run directories' locks. Each worker therefore, from its initializer:

* on Linux, asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``
  through ctypes);
* everywhere, starts a watchdog thread that polls its parent pid once a second and sends
  itself SIGTERM when the parent is gone (the fallback where ``prctl`` is missing).

SIGTERM makes a running trial finish its step, write a checkpoint and stop (status
``interrupted``, so a rerun of the sweep resumes it); an idle worker just exits. Once the
trial has stopped, or at the latest :data:`GRACE_S` seconds later, the watchdog kills the
worker outright (the run's ``flock`` goes with it, so a rerun can take its directory at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1
GRACE_S = 60.0
POLL_S = 1.0


def worker_pool(parallel: int) -> ProcessPoolExecutor:
    """A pool of ``parallel`` spawn-ed workers that die with this process."""
    return ProcessPoolExecutor(max_workers=max(1, parallel),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def _parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int, *, grace_s: float = GRACE_S, poll_s: float = POLL_S) -> None:
    """Worker initializer: SIGTERM this process when ``parent`` dies, SIGKILL ``grace_s`` later.
    """
    _parent_death_signal(signal.SIGTERM)
    watchdog = threading.Thread(target=_watch, args=(parent, grace_s, poll_s),
                                name="bilevel-parent-watchdog", daemon=True)
    watchdog.start()


def _watch(parent: int, grace_s: float, poll_s: float) -> None:
    # Also covers a parent that died before prctl took effect (we were re-parented already).
    while os.getppid() == parent:
        time.sleep(poll_s)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGTERM)
    # A run that took the SIGTERM checkpoints and returns, restoring the default handler;
    # the worker would then wait on its dead parent's queue, so end it here.
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            break
    os.kill(os.getpid(), signal.SIGKILL)
