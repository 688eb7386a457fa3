"""Data tests run with the network blocked: any socket connection raises at once."""

from __future__ import annotations

import pytest

from tests.offline import block_network


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data tests run with the network blocked (see tests/offline.py)."""
    block_network(monkeypatch)


@pytest.fixture
def data_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty data directory, also set as $BILEVEL_DATA so nothing reaches the user cache."""
    d = tmp_path / "data"
    monkeypatch.setenv("BILEVEL_DATA", str(d))
    return d
