"""A strict YAML loader that remembers where every key came from.

PyYAML's ``safe_load`` reads ``1e-3`` as the *string* ``'1e-3'``, maps ``off``/``no`` to
``False`` and silently lets a duplicate key win. This loader:

* rejects duplicate keys (naming both lines),
* reads ``1e-3``, ``5E+2`` as floats,
* accepts only ``true``/``false`` as booleans (``off`` stays the string ``'off'``),
* returns, beside the data, a map from each dotted key to ``file:line`` so that config errors
  can point at the line to fix,
* refuses what no config needs and a hostile file uses: explicit tags on mappings and
  sequences (``!!python/object/apply``, ``!!set``; PyYAML's safe constructor would only drop
  them), keys that are not plain scalars, nesting deeper than :data:`MAX_DEPTH`, and more than
  :data:`MAX_NODES` values once aliases are expanded (a 600-byte "billion laughs" file would
  otherwise expand to gigabytes, because every alias is rebuilt to record its own lines).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from bilevel.errors import ConfigError

Sources = dict[str, str]  # dotted key -> "file:line" (or "--set key=value")

MAX_NODES = 100_000  # values (mapping/sequence items, scalars) after alias expansion
MAX_DEPTH = 64  # nesting of mappings and sequences

_BOOL = "tag:yaml.org,2002:bool"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
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


class _Budget:
    """Counts the nodes built (aliases included) against :data:`MAX_NODES`."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.left = MAX_NODES
        self.entry: tuple[int, str] | None = None  # (line, key) of the top-level key being built

    def spend(self, node: yaml.Node, depth: int) -> None:
        line = node.start_mark.line + 1
        self.left -= 1
        if self.left < 0:
            at, key = self.entry or (line, "")
            raise ConfigError(
                f"{self.where}:{at}: {f'key {key!r}' if key else 'the config'} expands to more "
                f"than {MAX_NODES} values (YAML anchors and aliases repeated inside each "
                "other?); a config may hold at most that many; write it out plainly"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{self.where}:{line}: nested more than {MAX_DEPTH} levels deep; "
                              "a config needs a few levels")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            plain = _MAP if isinstance(node, yaml.MappingNode) else _SEQ
            if node.tag != plain:
                raise ConfigError(f"{self.where}:{line}: YAML tag {node.tag!r} is not allowed in "
                                  "a config; remove it (only plain mappings, lists and values)")


def _build(node: yaml.Node, loader: _StrictLoader, where: str, prefix: str,
           sources: Sources, problems: list[str], budget: _Budget, depth: int = 0) -> Any:
    """Construct python data from ``node``, recording each key's line in ``sources``."""
    budget.spend(node, depth)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{where}:{line}: a key must be a plain name, not a "
                                  f"{'mapping' if isinstance(key_node, yaml.MappingNode) else 'list'}")
            budget.spend(key_node, depth + 1)
            key = loader.construct_object(key_node, deep=True)
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
            if depth == 0:
                budget.entry = (line, dotted)
            out[key] = _build(value_node, loader, where, dotted, sources, problems, budget,
                              depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            dotted = f"{prefix}.{i}" if prefix else str(i)
            sources[dotted] = f"{where}:{item.start_mark.line + 1}"
            items.append(_build(item, loader, where, dotted, sources, problems, budget,
                                depth + 1))
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
    try:
        loader = _StrictLoader(text)  # its reader already refuses control characters
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}:{text[: getattr(exc, 'position', 0)].count(chr(10)) + 1}: "
                          f"invalid YAML: {getattr(exc, 'reason', exc)} "
                          f"(character {getattr(exc, 'character', '?')!r})") from None
    try:
        node = loader.get_single_node()
        sources: Sources = {}
        problems: list[str] = []
        data = None if node is None else _build(node, loader, where, prefix, sources, problems,
                                                _Budget(where))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    except RecursionError:  # the composer recurses once per level, before _build counts
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; "
                          "a config needs a few levels") from None
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
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                          f"at offset {exc.start}); save the config as UTF-8") from None
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
