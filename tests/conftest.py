"""Shared test setup: one thread per worker, float64 where tests ask, the UCI files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


FIXTURES = REPO / "tests" / "fixtures"  # the UCI files shipped with the tests


def shared_data_dir() -> Path:
    """The folder holding ``uci/`` that tests read: ``$BILEVEL_SHARED_DATA``, else
    ``../shared/data`` beside the repo, else the copy shipped in ``tests/fixtures`` (the same
    files, sha256-pinned), so that no UCI test is skipped on a user's machine."""
    env = os.environ.get("BILEVEL_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "uci").is_dir():
            return cand
    return FIXTURES


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
