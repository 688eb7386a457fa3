"""Linux /proc helpers for the Ray tests: a process's descendants, whether they outlive it,
and the TCP addresses they listen on (no psutil needed)."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path


def marked(name: str, value: str) -> list[int]:
    """Pids of this user's processes whose (initial) environment has ``name=value``."""
    want = f"{name}={value}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:  # another user's, or gone
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _hex_addr(text: str, family: int) -> str:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if family == socket.AF_INET:
        raw = raw[::-1]
    else:  # four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"{ipaddress.ip_address(raw)}:{int(port, 16)}"


def listening(pids: list[int]) -> dict[int, list[str]]:
    """``{pid: ["127.0.0.1:6379", ...]}``: the TCP sockets each pid listens on."""
    listen: dict[str, str] = {}  # socket inode -> address
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                listen[f[9]] = _hex_addr(f[1], family)
    out: dict[int, list[str]] = {}
    for pid in pids:
        addrs = []
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in listen:
                    addrs.append(listen[link[8:-1]])
        except OSError:
            continue
        out[pid] = sorted(addrs)
    return out


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's gRPC lists it
    return (mapped or ip).is_loopback


def _stat() -> dict[int, tuple[int, str]]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = (int(rest[1]), rest[19])  # ppid, start time
            except (OSError, IndexError):
                continue
    return out


def descendants(root: int) -> dict[int, str]:
    """``{pid: start time}`` of every living descendant of ``root``."""
    procs, kids = _stat(), {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = {}, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = procs[pid][1]
        todo.extend(kids.get(pid, []))
    return found


def still_alive(seen: dict[int, str]) -> list[int]:
    """Those of ``seen`` (from :func:`descendants`) that are the same processes and alive
    (zombies count as gone)."""
    procs = _stat()
    out = []
    for pid, start in seen.items():
        if procs.get(pid, (0, ""))[1] != start:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out
