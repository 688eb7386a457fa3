"""A tqdm progress bar with rate and ETA on a terminal; silent in logs and CI."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_enabled(requested: bool = True) -> bool:
    """True when a bar is wanted, stderr is a terminal and ``CI`` is not set."""
    return requested and sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(*, total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """A bar over steps ``initial..total`` showing rate and ETA (disabled: a no-op bar)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
        leave=True,
    )
