"""Ray Tune engine (slow: a Ray cluster costs ~20 s to start): ASHA over run directories
with bilevel checkpoints inside Ray checkpoints, and a resume of the finished experiment."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilevel.data import fetch_dataset
from bilevel.sweep.scheduled import scheduled_sweep
from tests.conftest import shared_data_dir

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray Tune is optional: pip install 'bilevel[ray]'")
tune = pytest.importorskip("ray.tune")


def test_ray_asha_reports_and_checkpoints_through_bilevel(tmp_path, monkeypatch):
    shared = shared_data_dir()
    fetch_dataset("uci_energy", tmp_path / "data", from_dir=shared)
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        report = scheduled_sweep(
            ["onepass/uci_energy.yaml"], ["onepass/random_validation.yaml"], scheduler="asha",
            engine="ray", out=tmp_path / "r", trials=3, max_resource=40, min_resource=10,
            reduction_factor=2, parallel=2, overrides=["logging.progress=false"],
            search=["inner.lr", "inner.weight_decay", "inner.momentum"])
        best = report["random_validation"]["best"]
        assert 0 < best["value"] < 2 and set(best["config"]) == {
            "inner.lr", "inner.weight_decay", "inner.momentum"}
        root = tmp_path / "r/random_validation/asha"
        runs = sorted(Path(root, "runs").glob("*/seg-000/run.json"))
        assert len(runs) == 3  # one bilevel run directory per Ray trial
        assert tune.Tuner.can_restore(str(root / "tune"))
        # Running the same command again restores the finished experiment (Tuner.restore).
        again = scheduled_sweep(
            ["onepass/uci_energy.yaml"], ["onepass/random_validation.yaml"], scheduler="asha",
            engine="ray", out=tmp_path / "r", trials=3, max_resource=40, min_resource=10,
            reduction_factor=2, parallel=2, overrides=["logging.progress=false"],
            search=["inner.lr", "inner.weight_decay", "inner.momentum"])
        assert again["random_validation"]["best"]["value"] == best["value"]
    finally:
        ray.shutdown()
