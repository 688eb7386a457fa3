"""Model tests never touch the network: sockets raise at once."""

from __future__ import annotations

import socket

import pytest


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network access is blocked in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
