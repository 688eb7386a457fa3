"""Data tests run with the network blocked: any socket connection raises at once."""

from __future__ import annotations

import socket

import pytest


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network access is blocked in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block in-process sockets, and point pip (a subprocess) at an empty local index."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")


@pytest.fixture
def data_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty data directory, also set as $BILEVEL_DATA so nothing reaches the user cache."""
    d = tmp_path / "data"
    monkeypatch.setenv("BILEVEL_DATA", str(d))
    return d
