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
import zipfile
from pathlib import Path
from typing import Any

from bilevel.data import images, small, text, uci
from bilevel.data._dataset import Dataset
from bilevel.data._errors import DataMissingError, DataVerificationError, UnknownDatasetError
from bilevel.data._integrity import array_digest, atomic_path, load_npz, save_npz
from bilevel.data._paths import fetch_command, resolve_data_dir
from bilevel.data._spec import Arrays, BuildOptions, DatasetSpec

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in (*images.SPECS, *small.SPECS, *text.SPECS, *uci.SPECS)}
FORMAT_VERSION = 1


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name``.

    Raises:
        UnknownDatasetError: ``name`` is not registered (the message lists the known names).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))} "
            "(`bilevel data list` describes each)"
        ) from None


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
    _check_pins(spec, digests, where="converted from the source", fix="the cache was not replaced")
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


def _check_pins(spec: DatasetSpec, digests: dict[str, str], *, where: str, fix: str) -> None:
    for key, pinned in spec.array_sha256.items():
        if digests.get(key) != pinned:
            raise DataVerificationError(
                f"{spec.name}: array {key!r} {where} has sha256 {digests.get(key)}, pinned "
                f"{pinned}; {fix}"
            )


def read_arrays(name: str, data_dir: str | os.PathLike[str] | None = None) -> Arrays:
    """The cached arrays of ``name``, checked against the manifest and the pinned sha256s;
    generated sets are computed when not cached.

    Raises:
        DataMissingError: not cached; the message is the exact fetch command.
        DataVerificationError: the cache is unreadable or an array differs from its
            manifest or pin (the message names the file and the command that rebuilds it).
    """
    spec, root = get_spec(name), resolve_data_dir(data_dir)
    npz, _ = _paths(root, name)
    if npz.is_file():
        return _load_verified(spec, root, data_dir is not None)
    if spec.generated:
        return spec.convert(None)
    raise _missing(name, root, data_dir is not None)


def _missing(name: str, root: Path, explicit_dir: bool) -> DataMissingError:
    return DataMissingError(
        f"data set {name!r} is not in {root}. Fetch it first (nothing downloads at training "
        f"time): {fetch_command(name, root if explicit_dir else None)}"
    )


def _load_verified(spec: DatasetSpec, root: Path, explicit_dir: bool) -> Arrays:
    """Read ``arrays.npz`` and check every array against ``manifest.json`` and the pins.

    Any unreadable piece (a truncated or byte-flipped ``.npz``, a manifest that is not the
    JSON we wrote) is a verification failure naming the file, never a traceback.
    """
    npz, manifest_path = _paths(root, spec.name)
    fix = f"rebuild the cache with `{fetch_command(spec.name, root if explicit_dir else None)}`"
    if not manifest_path.is_file():
        raise DataVerificationError(f"{spec.name}: {manifest_path} is missing; {fix}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = {k: str(v["sha256"]) for k, v in manifest["arrays"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataVerificationError(
            f"{spec.name}: {manifest_path} is not a valid manifest ({type(exc).__name__}: {exc}); {fix}"
        ) from None
    try:
        arrays = load_npz(npz)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataVerificationError(
            f"{spec.name}: {npz} is unreadable ({type(exc).__name__}: {exc}); {fix}"
        ) from None
    digests = {k: array_digest(v) for k, v in arrays.items()}
    if digests != expected:
        bad = sorted(k for k in expected.keys() | digests.keys() if digests.get(k) != expected.get(k))
        raise DataVerificationError(
            f"{spec.name}: arrays {bad} in {npz} differ from {manifest_path.name}; {fix}"
        )
    _check_pins(spec, digests, where=f"in {npz}", fix=fix)
    return arrays


def verify_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Recompute every cached array's sha256 and compare with the manifest and the pins.

    Returns:
        ``{"name", "status": "ok", "arrays"}`` (generated sets that are not cached: status
        ``"generated"``; they are computed on demand and need no fetch).

    Raises:
        UnknownDatasetError: ``name`` is not registered (exit code 2).
        DataMissingError: not cached; the message gives the fetch command (exit code 3).
        DataVerificationError: unreadable cache, or an array missing, reshaped or altered
            (exit code 3).
    """
    spec, root = get_spec(name), resolve_data_dir(data_dir)
    npz, _ = _paths(root, name)
    if not npz.is_file():
        if spec.generated:
            return {"name": name, "status": "generated", "arrays": 0}
        raise _missing(name, root, data_dir is not None)
    arrays = _load_verified(spec, root, data_dir is not None)
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
