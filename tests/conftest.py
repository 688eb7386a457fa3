"""Shared test setup: one thread per worker, float64 where tests ask, data from shared/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The UCI files CI and tests read (``../shared/data`` beside the repo), if present."""
    env = os.environ.get("BILEVEL_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "uci").is_dir():
            return cand
    return None


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
