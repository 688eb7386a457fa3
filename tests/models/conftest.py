"""Model tests never touch the network."""

from __future__ import annotations

import pytest

from tests.offline import block_network


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    block_network(monkeypatch)
