"""Where data lives: ``--data-dir`` / ``data_dir=``, then ``$BILEVEL_DATA``, then a per-user cache.

The current directory is never used implicitly, so a training run started anywhere reads
the same cache and never litters the working tree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "BILEVEL_DATA"


def _user_cache_root() -> Path:
    """The platform's per-user cache folder (XDG on Linux, Caches on macOS, LOCALAPPDATA)."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local"))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache"


def default_data_dir() -> Path:
    """The data directory used when none is given: ``$BILEVEL_DATA`` or ``<user cache>/bilevel/data``.

    Returns:
        An absolute path; it may not exist yet.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (_user_cache_root() / "bilevel" / "data").resolve()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` if given (made absolute), else :func:`default_data_dir`."""
    if data_dir is None:
        return default_data_dir()
    return Path(data_dir).expanduser().resolve()


def fetch_command(name: str, data_dir: Path | None = None) -> str:
    """The shell command that fetches ``name`` into ``data_dir`` (the default when ``None``)."""
    extra = "" if data_dir is None or data_dir == default_data_dir() else f" --data-dir {data_dir}"
    return f"bilevel data fetch {name}{extra}"
