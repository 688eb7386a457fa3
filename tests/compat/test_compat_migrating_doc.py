"""docs/migrating.md: every bilevel snippet runs, in order, in one namespace.

A snippet is a ```python block that does not import higher, torchopt or auxilearn (their
snippets are fenced as ```py and only read). The higher section's snippets run against
bilevel.compat.higher, and the results they leave behind are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"
FOREIGN = re.compile(r"^\s*(import|from)\s+(higher|torchopt|auxilearn)\b", re.MULTILINE)


def _snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [b for b in blocks if not FOREIGN.search(b)]


def test_the_doc_marks_foreign_snippets_apart():
    text = DOC.read_text()
    assert "```py\nimport torchopt" in text and "```py\nfrom auxilearn" in text
    assert "```python\nimport higher   # before" in text  # the one-line "before"
    assert len(_snippets()) >= 8


def test_bilevel_snippets_run():
    ns: dict = {}
    for i, code in enumerate(_snippets()):
        try:
            exec(compile(code, f"{DOC.name}[snippet {i}]", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message names the snippet
            raise AssertionError(f"snippet {i} of docs/migrating.md failed:\n{code}") from e
    assert ns["higher"].__name__ == "bilevel.compat.higher"
    assert all(p.grad is not None for p in ns["teacher"].parameters())
    assert float(ns["d_lr"].abs()) > 0 and float(ns["d_momentum"].abs()) > 0
    # (tests/compat/test_compat_higher_seeds.py checks such loops against the engine)
    assert set(ns["teacher_grads"]) == {n for n, _ in ns["teacher"].named_parameters()}
    assert ns["lr"].grad is None  # autograd.grad was used, nothing accumulated
    assert float(ns["d_log_wd"].abs()) > 0
    assert ns["meta_opt"].last_info["grad_norm"] > 0
