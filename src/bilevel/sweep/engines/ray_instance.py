"""Ray instances for the Ray engine: a private local one, or a cluster joined with a timeout.

* :func:`start_local`: a single-node instance whose every socket is on loopback, with no
  dashboard, whose processes end when the driver ends, even by SIGKILL (Linux);
* :func:`connect`: join ``HOST:PORT``, or a ConfigError within seconds when no head answers
  or it refuses this process's token (Ray's token authentication).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError


def require_ray() -> Any:
    """``ray`` (with Tune), or a ConfigError saying how to install it."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise ConfigError("--engine ray needs Ray Tune: pip install 'bilevel[ray]' "
                          "(or 'ray[tune]')") from None
    return ray


_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is 127.0.0.1

# The reaper: a small process that, while the driver lives, remembers every descendant of the
# driver (pid and start time, polled every 0.5 s), and when its stdin (a pipe only the driver
# holds) closes, i.e. the driver exited or was killed, ends those still alive. Ray fate-shares
# its GCS and raylet with the driver, but its dashboard and runtime-env agents hang in their
# exit once the raylet is gone (Ray 2.60: "The parent is dead", then alive under pid 1), and
# their environment and command line are overwritten by setproctitle, so only the process
# tree recorded beforehand identifies them.
_REAP = r"""
import os, select, signal, sys, time
if os.fork():
    os._exit(0)  # the driver waits for this parent only: no child of its own left running
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
root = int(sys.argv[1])
def table():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(rest[1]), rest[19])  # ppid, start time
            except (OSError, IndexError):
                pass
    return out
seen = {}
while not select.select([sys.stdin], [], [], 0.5)[0]:
    procs, kids = table(), {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    todo = list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        seen[pid] = procs[pid][1]
        todo.extend(kids.get(pid, []))
if sys.stdin.buffer.read(1):
    sys.exit(0)  # not EOF: told to stand down
for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.5)):
    procs = table()
    for pid, start in seen.items():
        if pid != os.getpid() and pid in procs and procs[pid][1] == start:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    time.sleep(wait)
"""
_reaper_pipe: list[int] = []


def _start_reaper() -> None:
    """Start this driver's reaper (once; Linux, where /proc exists)."""
    if _reaper_pipe or not Path("/proc/self/stat").exists():
        return
    read, write = os.pipe()  # not inheritable: Ray's processes never hold the write end
    subprocess.run([sys.executable, "-c", _REAP, str(os.getpid())], stdin=read,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   start_new_session=True)  # outlives a Ctrl-C or kill of our group
    os.close(read)
    _reaper_pipe.append(write)  # held open until this process ends


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Make Ray take 127.0.0.1 as this node's address while it starts or connects.

    Ray rewrites ``127.0.0.1`` to the host's address and then listens on all interfaces (or,
    joining a head on loopback, retries the host's address for minutes). Its switch
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps loopback; Ray reads it at import, so the
    constant is patched too, and both are restored afterwards.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK] = "0"  # for the Python processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK, None)
        else:
            os.environ[_LOOPBACK] = saved_env


def start_local(*, num_cpus: int | None = None) -> None:
    """Start a private single-node Ray instance: every socket on loopback, no dashboard,
    never attached to a stale cluster left in /tmp/ray, and its processes ended when this
    driver ends, even by SIGKILL (Linux).

    Ray resolves ``_node_ip_address="127.0.0.1"`` to the host's address and then listens on
    all interfaces; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read by Ray at import, so
    also patched here) its node address is loopback and every server binds to it.
    """
    ray = require_ray()
    _start_reaper()
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def connect(address: str, *, timeout: float = 10.0) -> None:
    """Join the Ray cluster at ``HOST:PORT``, or raise ConfigError within ``timeout`` s.

    Ray itself retries an unreachable GCS for minutes, so the address is first checked with
    a plain TCP connection. Token authentication (``RAY_AUTH_MODE=token``, Ray's default for
    ``ray start``) needs the head's token here: ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``.
    """
    ray = require_ray()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: give HOST:PORT of the head's GCS "
                          "(`ray start --head --port PORT`)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"--ray-address {address}: cannot reach a Ray head there within "
                    f"{timeout:.0f} s ({exc}); start one with `ray start --head --port "
                    f"{port}`, check the address, or leave --ray-address out to run a "
                    "private local instance") from None
            time.sleep(0.5)
    try:
        with _loopback_node() if _is_loopback(host) else contextlib.nullcontext():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: Ray refused to connect ({exc}); if it "
                          "says InvalidAuthToken, give this process the head's token "
                          "(RAY_AUTH_TOKEN or ~/.ray/auth_token), see docs/sweeps.md") from None


__all__ = ["connect", "start_local"]
