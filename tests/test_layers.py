"""The layer rule of docs/architecture.md: a module imports only from layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "bilevel"

# Rank of each top-level part of the package. A module may import parts of lower rank,
# and of its own part. Leaves import nothing from the package at all.
RANK = {
    "errors": 0,
    "tree": 1, "functional": 1,
    "optim": 2, "run": 2, "parallel": 2,
    "hypergrad": 3, "meta": 3, "report": 3,
    "compat": 3.5,  # drop-ins (compat.higher) over hypergrad/optim/functional; recipes may use them
    "recipes": 4,  # the registry and the folder protocol (recipes/*.py)
    "folder": 4.5,  # one recipe folder (recipes/<paper>/): anything below sweep, no other folder
    "sweep": 5,
    "commands": 6,
    "cli": 7, "__main__": 8,
}
LEAVES = {"data", "models"}
SIBLINGS = {("hypergrad", "meta"), ("meta", "hypergrad")}


FOLDERS = {p.name for p in (PKG / "recipes").iterdir() if (p / "__init__.py").is_file()}


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    if rel.parts[0] == "recipes" and rel.parts[1] in FOLDERS:
        return f"folder:{rel.parts[1]}"
    return rel.parts[0].removesuffix(".py")


def _rank(part: str) -> float:
    return RANK["folder" if part.startswith("folder:") else part]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "bilevel.recipes":  # `from bilevel.recipes import gtn`
                names += [f"bilevel.recipes.{a.name}" for a in node.names if a.name in FOLDERS]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: use absolute imports (from bilevel.x import y)")
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "bilevel":
                continue
            if len(parts) > 2 and parts[1] == "recipes" and parts[2] in FOLDERS:
                found.add(f"folder:{parts[2]}")
            else:
                found.add(parts[1] if len(parts) > 1 else "")
    return found


def test_every_part_has_a_rank():
    parts = {_part(p) for p in PKG.rglob("*.py") if p.parent != PKG or p.name != "__init__.py"}
    unknown = {p for p in parts if not p.startswith("folder:")} - set(RANK) - LEAVES
    assert not unknown, f"new top-level parts need a rank in tests/test_layers.py: {unknown}"


def test_imports_go_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        if path == PKG / "__init__.py":
            continue  # the curated public face imports lazily from everywhere
        me = _part(path)
        for other in _imports(path):
            if other in ("", me):
                continue
            if me in LEAVES:
                bad.append(f"{path.relative_to(PKG)} (a leaf) imports bilevel.{other}")
            elif other.startswith("folder:"):  # only the registry reaches a folder, by name
                bad.append(f"{path.relative_to(PKG)} imports the recipe folder "
                           f"{other.removeprefix('folder:')}: shared code must not know a paper")
            elif (me, other) in SIBLINGS:
                bad.append(f"{path.relative_to(PKG)}: {me} and {other} never import each other")
            elif other not in LEAVES and _rank(other) >= _rank(me):
                bad.append(f"{path.relative_to(PKG)} imports bilevel.{other} (not lower)")
    assert not bad, "\n".join(bad)


def test_the_parser_sees_imports(tmp_path):
    # The rule is only as good as the import parser: it must see both import forms.
    p = tmp_path / "probe.py"
    p.write_text("import bilevel.optim\nfrom bilevel.tree import tree_map\nimport torch\n")
    assert _imports(p) == {"optim", "tree"}
    p.write_text("from bilevel.recipes.gtn.teacher import Teacher\nfrom bilevel.recipes import get, alig\n")
    assert _imports(p) == {"folder:gtn", "folder:alig", "recipes"}

