"""Collect run directories for a report and group runs that differ only by seed."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.run import config_hash, read_metrics
from bilevel.run.config import flatten

# Keys that do not make two runs different experiments.
_IGNORED = ("run.seed", "logging.", "checkpoint.", "run.device", "run.threads")


@dataclass
class RunRecord:
    """One run as the report sees it."""

    path: Path
    config: dict[str, Any]
    status: str
    records: list[dict[str, Any]]
    final: dict[str, float]
    group: str = ""


def find_runs(patterns: Iterable[str]) -> list[Path]:
    """Run directories named by paths or globs; a directory of runs is searched recursively."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for m in map(Path, matches):
            if (m / "run.json").is_file():
                found.append(m)
            elif m.is_dir():
                found += sorted(p.parent for p in m.rglob("run.json"))
    if not found:
        raise ConfigError(f"no run directories (with run.json) in {' '.join(patterns)}")
    return list(dict.fromkeys(found))


def load_run(path: Path) -> RunRecord:
    """Read run.json, metrics.jsonl and summary.json (final values; else the last records)."""
    info = json.loads((path / "run.json").read_text())
    mpath = path / "metrics.jsonl"
    records = [r for r in read_metrics(mpath) if "event" not in r] if mpath.exists() else []
    final: dict[str, float] = {}
    for r in records:  # last logged value of each metric
        final.update({k: v for k, v in r.items() if k not in ("step", "wall")
                      and isinstance(v, (int, float)) and not isinstance(v, bool)})
    summary = path / "summary.json"
    if summary.exists():
        final.update(json.loads(summary.read_text()))
    return RunRecord(path, info["config"], info.get("status", "?"), records, final)


def group_runs(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Group runs whose configs agree except for seeds and logging; label by differences."""
    keyed: dict[str, dict[str, Any]] = {}
    for run in runs:
        flat = {k: v for k, v in flatten(run.config).items() if not k.startswith(_IGNORED)}
        run.group = config_hash(flat)
        keyed[run.group] = flat
    varying = sorted({k for flat in keyed.values() for k in flat
                      if len({repr(f.get(k)) for f in keyed.values()}) > 1})
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        flat = keyed[run.group]
        label = ", ".join(f"{k}={flat.get(k)}" for k in varying) or str(flat.get("recipe", "runs"))
        groups.setdefault(label, []).append(run)
    return groups
