"""One way to run tests with the network blocked: sockets raise at once, pip sees no index."""

from __future__ import annotations

import socket

import pytest


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network access is blocked in tests")


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block in-process connections and name lookups; point pip (a subprocess) at nothing."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
