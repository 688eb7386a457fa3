"""The registry of data sets and the four operations on it: list, fetch, verify, load.

Cache layout (one folder per data set under the data directory)::

    <data_dir>/<name>/arrays.npz      plain arrays, read with allow_pickle=False
    <data_dir>/<name>/manifest.json   source, raw sha256s, per-array sha256s, time

A fetch works in a temporary folder beside the cache and renames the results into place
only after every raw file matched its pinned digest and converted cleanly, so a refused or
interrupted fetch keeps the previous cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bilevel.data import images, small, text, uci
from bilevel.data._dataset import Dataset
from bilevel.data._errors import DataMissingError, DataVerificationError
from bilevel.data._integrity import array_digest, atomic_path, load_npz, save_npz
from bilevel.data._paths import fetch_command, resolve_data_dir
from bilevel.data._spec import Arrays, BuildOptions, DatasetSpec

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in (*images.SPECS, *small.SPECS, *text.SPECS, *uci.SPECS)}
FORMAT_VERSION = 1


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name``; an unknown name lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(REGISTRY)}") from None


def _paths(data_dir: Path, name: str) -> tuple[Path, Path]:
    return data_dir / name / "arrays.npz", data_dir / name / "manifest.json"


def fetch_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, from_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Get, verify and convert ``name`` into the cache; return its manifest.

    Args:
        name: a registered data set.
        data_dir: the data directory (default: :func:`~bilevel.data.default_data_dir`).
        from_dir: read the raw files from this folder instead of the network.

    Raises:
        DataFetchError: no network, or a file missing from ``from_dir``.
        DataVerificationError: a raw file or the converted arrays do not match their pins.
    """
    spec, root = get_spec(name), resolve_data_dir(data_dir)
    npz, manifest_path = _paths(root, name)
    npz.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=npz.parent))
    try:
        src = None if from_dir is None else Path(from_dir).expanduser().resolve()
        raw = {} if spec.generated else spec.get_raw(work, src)
        arrays = spec.convert(None if spec.generated else work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    digests = {k: array_digest(v) for k, v in arrays.items()}
    _check_pins(spec, digests)
    manifest = {
        "name": name, "format_version": FORMAT_VERSION, "source": spec.source,
        "from_dir": None if from_dir is None else str(from_dir), "raw_sha256": raw,
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": digests[k]} for k, v in arrays.items()},
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_npz(npz, arrays)
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    manifest["path"] = str(npz)
    return manifest


def _check_pins(spec: DatasetSpec, digests: dict[str, str]) -> None:
    for key, pinned in spec.array_sha256.items():
        if digests.get(key) != pinned:
            raise DataVerificationError(
                f"{spec.name}: converted array {key!r} has sha256 {digests.get(key)}, pinned {pinned}; "
                "the cache was not replaced"
            )


def read_arrays(name: str, data_dir: str | os.PathLike[str] | None = None) -> Arrays:
    """The cached arrays of ``name``; generated sets are computed when not cached.

    Raises:
        DataMissingError: not cached; the message is the exact fetch command.
    """
    spec, root = get_spec(name), resolve_data_dir(data_dir)
    npz, _ = _paths(root, name)
    if npz.is_file():
        return load_npz(npz)
    if spec.generated:
        return spec.convert(None)
    raise DataMissingError(
        f"data set {name!r} is not in {root}. Fetch it first (nothing downloads at training "
        f"time): {fetch_command(name, root if data_dir is not None else None)}"
    )


def verify_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Recompute every cached array's sha256 and compare with the manifest and the pins.

    Returns:
        ``{"name", "status": "ok" | "missing", "arrays"}``.

    Raises:
        DataVerificationError: an array is missing, reshaped or altered.
    """
    spec, root = get_spec(name), resolve_data_dir(data_dir)
    npz, manifest_path = _paths(root, name)
    if not (npz.is_file() and manifest_path.is_file()):
        return {"name": name, "status": "missing", "arrays": 0}
    manifest = json.loads(manifest_path.read_text())
    arrays = load_npz(npz)
    digests = {k: array_digest(v) for k, v in arrays.items()}
    expected = {k: v["sha256"] for k, v in manifest["arrays"].items()}
    if digests != expected:
        bad = sorted(k for k in expected.keys() | digests.keys() if digests.get(k) != expected.get(k))
        raise DataVerificationError(
            f"{name}: cached arrays {bad} differ from {manifest_path.name}; run "
            f"`{fetch_command(name)}` to rebuild the cache"
        )
    _check_pins(spec, digests)
    return {"name": name, "status": "ok", "arrays": len(arrays)}


def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One row per data set: name, task, summary, source, cached (bool), size in bytes."""
    root = resolve_data_dir(data_dir)
    rows = []
    for name, spec in REGISTRY.items():
        npz, _ = _paths(root, name)
        cached = npz.is_file()
        rows.append({"name": name, "task": spec.task, "summary": spec.summary, "source": spec.source,
                     "cached": cached, "generated": spec.generated, "bytes": npz.stat().st_size if cached else 0})
    return rows


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split_seed: int | None = 0,
    *,
    val_size: int | None = None,
    normalize: bool = False,
) -> Dataset:
    """Load a cached data set as tensors: ``ds.train/val/test.x/.y`` and ``ds.info``.

    Args:
        name: one of :data:`REGISTRY` (``bilevel data list``).
        data_dir: data directory; default ``$BILEVEL_DATA``, else the per-user cache.
        split_seed: seed of the validation hold-out (``None``: the last rows; see each
            module for sets whose split is fixed by the publisher).
        val_size: validation rows (default: the seed's, per data set).
        normalize: images only: subtract ``info["mean"]`` and divide by ``info["std"]``.

    Raises:
        DataMissingError: not fetched yet; the message gives the fetch command.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.sizes(), ds.info["num_classes"]
        ((1200, 300, 297), 10)
    """
    spec = get_spec(name)
    opts = BuildOptions(split_seed=split_seed, val_size=val_size, normalize=normalize)
    return spec.build(read_arrays(name, data_dir), opts)
