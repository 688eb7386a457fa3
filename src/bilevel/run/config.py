"""Layered YAML configs validated by pydantic, with errors that point at file and line.

A config is built from YAML files (later files override earlier ones, dicts merge key by key)
and ``--set key.sub=value`` overrides, then validated against a pydantic model. All problems
of a config are reported together, each with its dotted key, where it was set (``file:line``),
the value received and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydantic

from bilevel.errors import ConfigError
from bilevel.run.yamlio import Sources, load_yaml, parse_override

M = TypeVar("M", bound=pydantic.BaseModel)


@dataclass
class RawConfig:
    """Merged, not yet validated config data and where each key came from."""

    data: dict[str, Any] = field(default_factory=dict)
    sources: Sources = field(default_factory=dict)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _drop_sources(sources: Sources, prefix: str) -> None:
    for key in [k for k in sources if k == prefix or k.startswith(prefix + ".")]:
        del sources[key]


def apply_override(raw: RawConfig, expr: str) -> None:
    """Apply one ``--set a.b=value`` override to ``raw`` in place."""
    key, value, sources = parse_override(expr)
    node = raw.data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if not (isinstance(value, dict) and isinstance(node.get(parts[-1]), dict)):
        _drop_sources(raw.sources, key)
        node[parts[-1]] = value
    else:
        node[parts[-1]] = _merge(node[parts[-1]], value)
    raw.sources.update(sources)


def load_layers(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> RawConfig:
    """Load YAML files in order, merge them, then apply ``--set`` overrides."""
    raw = RawConfig()
    for path in paths:
        data, sources = load_yaml(path)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of keys, got {data!r}")
        for key in data:
            if not isinstance(data[key], dict):
                _drop_sources(raw.sources, key)
        raw.data = _merge(raw.data, data)
        raw.sources.update(sources)
    for expr in overrides:
        apply_override(raw, expr)
    return raw


def _models(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """Every pydantic model in ``annotation`` (``X``, ``X | None``, ``A | B`` tagged)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def _walk(model: type[pydantic.BaseModel], loc: tuple[Any, ...]
          ) -> tuple[tuple[Any, ...], type[pydantic.BaseModel] | None]:
    """``loc`` as the user wrote it, and the model that holds its last key.

    Pydantic puts the tag of a tagged union member into the location
    (``hypergrad.unrolled.solver``); the user wrote ``hypergrad.solver``, so tags are dropped.
    """
    current: type[pydantic.BaseModel] | None = model
    members: dict[str, type[pydantic.BaseModel]] = {}
    clean: list[Any] = []
    parent: type[pydantic.BaseModel] | None = model
    for part in loc:
        if part in members:  # a tag: step into that member, not into a key
            current, members = members[part], {}
            continue
        clean.append(part)
        parent = current
        if current is None or part not in current.model_fields:
            current, members = None, {}
            continue
        field = current.model_fields[part]
        found = _models(field.annotation)
        disc = field.discriminator if isinstance(field.discriminator, str) else None
        members = {typing.get_args(m.model_fields[disc].annotation)[0]: m for m in found
                   if disc and disc in m.model_fields}
        current = found[0] if len(found) == 1 else None
    return tuple(clean), parent


def _where(loc: tuple[Any, ...], sources: Sources) -> str:
    for n in range(len(loc), 0, -1):
        dotted = ".".join(str(p) for p in loc[:n])
        if dotted in sources:
            return sources[dotted] if n == len(loc) else f"{sources[dotted]}, in {dotted}"
    return "not set in any file"


def _describe(err: Mapping[str, Any], model: type[pydantic.BaseModel], sources: Sources) -> str:
    loc, holder = _walk(model, tuple(err["loc"]))
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the tag key itself
        loc = (*loc, str(err.get("ctx", {}).get("discriminator", "method")).strip("'"))
        err = {**err, "input": err["input"].get(loc[-1]) if isinstance(err["input"], dict)
               else err["input"]}
    key = ".".join(str(p) for p in loc) or "(top level)"
    where = _where(loc, sources)
    if err["type"] == "extra_forbidden":
        allowed = sorted(holder.model_fields) if holder is not None else []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        fix = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{key} ({where}): unknown key{fix}; allowed keys: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{key} ({where}): required key is missing"
    shown = repr(err["input"])
    if len(shown) > 120:  # a long list or a huge string: the key and line say enough
        shown = shown[:100] + f"... ({len(shown)} characters)"
    return f"{key} = {shown} ({where}): {err['msg']}"


def validate(model: type[M], raw: RawConfig, *, ignore: Iterable[str] = ()) -> M:
    """Validate ``raw.data`` (minus top-level keys in ``ignore``) against ``model``.

    Raises:
        ConfigError: listing every problem, each with dotted key, ``file:line``, value and
            what is allowed.
    """
    skip = set(ignore)
    data = {k: v for k, v in raw.data.items() if k not in skip}
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        lines = [_describe(err, model, raw.sources) for err in errors]
        head = f"invalid config ({len(lines)} problem{'s' if len(lines) > 1 else ''}):"
        raise ConfigError("\n  ".join([head, *lines])) from None


def config_hash(resolved: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved config."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def same_value(a: Any, b: Any) -> bool:
    """``a == b``, except that NaN equals NaN (also inside lists), so that a config holding
    a NaN still equals itself when a run is resumed or rolled back."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)


_ABSENT = object()


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs, as ``key: old -> new``."""
    a, b = flatten(old), flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if not same_value(a.get(k, _ABSENT), b.get(k, _ABSENT))
    ]
