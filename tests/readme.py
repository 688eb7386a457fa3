"""Read a fenced ```python block out of a Markdown file by the marker line before it
(``<!-- example: NAME -->``), so that tests execute the documented examples verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def example(name: str, path: str = "README.md") -> str:
    text = (ROOT / path).read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    if m is None:
        raise AssertionError(f"{path} has no ```python block after <!-- example: {name} -->")
    return m.group(1)


def user_lines(code: str) -> int:
    """Lines a user writes: non-blank, not comment-only."""
    return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))
