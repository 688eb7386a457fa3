"""A strict YAML loader that remembers where every key came from.

PyYAML's ``safe_load`` reads ``1e-3`` as the *string* ``'1e-3'``, maps ``off``/``no`` to
``False`` and silently lets a duplicate key win. This loader:

* rejects duplicate keys (naming both lines),
* reads ``1e-3``, ``5E+2`` as floats,
* accepts only ``true``/``false`` as booleans (``off`` stays the string ``'off'``),
* returns, beside the data, a map from each dotted key to ``file:line`` so that config errors
  can point at the line to fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from bilevel.errors import ConfigError

Sources = dict[str, str]  # dotted key -> "file:line" (or "--set key=value")

_BOOL = "tag:yaml.org,2002:bool"
_FLOAT = "tag:yaml.org,2002:float"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML-1.2-like booleans and exponent floats."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _build(node: yaml.Node, loader: _StrictLoader, where: str, prefix: str,
           sources: Sources, problems: list[str]) -> Any:
    """Construct python data from ``node``, recording each key's line in ``sources``."""
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                key = str(key)
            dotted = f"{prefix}.{key}" if prefix else key
            if key in out:
                problems.append(
                    f"{where}:{line}: duplicate key {dotted!r} (first given on line "
                    f"{first_line[key]}); keep one of them"
                )
                continue
            first_line[key] = line
            sources[dotted] = f"{where}:{line}"
            out[key] = _build(value_node, loader, where, dotted, sources, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            dotted = f"{prefix}.{i}" if prefix else str(i)
            sources[dotted] = f"{where}:{item.start_mark.line + 1}"
            items.append(_build(item, loader, where, dotted, sources, problems))
        return items
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, *, where: str = "<string>", prefix: str = "") -> tuple[Any, Sources]:
    """Parse one YAML document strictly.

    Args:
        text: the YAML text.
        where: the name used in messages and in the returned sources (a file path).
        prefix: a dotted key prepended to every recorded key (for ``--set a.b=...``).

    Returns:
        ``(data, sources)``; ``data`` is ``None`` for an empty document.

    Raises:
        ConfigError: on a YAML syntax error or duplicate keys (all of them), naming lines.
    """
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        sources: Sources = {}
        problems: list[str] = []
        data = None if node is None else _build(node, loader, where, prefix, sources, problems)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: invalid YAML: {exc.problem}") from None
    finally:
        loader.dispose()
    if problems:
        raise ConfigError("\n".join(problems))
    return data, sources


def load_yaml(path: str | Path) -> tuple[Any, Sources]:
    """Read and parse a YAML file strictly (see :func:`parse_yaml`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_yaml(text, where=str(path))


def parse_override(expr: str) -> tuple[str, Any, Sources]:
    """Parse one ``--set key.sub=value`` override; the value is read as YAML.

    Returns:
        ``(dotted_key, value, sources)``.
    """
    key, sep, raw = expr.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {expr!r}: expected KEY=VALUE with a dotted key, e.g. --set inner.lr=0.1"
        )
    value, sources = parse_yaml(raw, where=f"--set {expr}", prefix=key)
    sources[key] = f"--set {expr}"
    return key, value, sources


def dump_yaml(data: Any) -> str:
    """Dump data as block-style YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
