"""UCI sets read from the shared folder: checksums, split sizes, normalisation, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bilevel.data import (
    DataMissingError,
    DataVerificationError,
    fetch_dataset,
    load_dataset,
    verify_dataset,
)
from bilevel.data.uci import TABLE
from tests.conftest import shared_data_dir

SHARED = shared_data_dir()


@pytest.mark.parametrize("short", sorted(TABLE))
def test_fetch_verify_and_split_sizes(short, data_dir):
    manifest = fetch_dataset(f"uci_{short}", from_dir=SHARED / "uci")
    _, _, _rows, n_features, _, n_train, n_val, n_test, data_sha, perm_sha = TABLE[short]
    assert manifest["raw_sha256"] == {f"{short}/data.txt": data_sha, f"{short}/permutation_indices.txt": perm_sha}
    assert verify_dataset(f"uci_{short}")["status"] == "ok"
    ds = load_dataset(f"uci_{short}")
    assert ds.sizes() == (n_train, n_val, n_test)
    assert ds.train.x.shape == (n_train, n_features) and ds.train.y.shape == (n_train, 1)
    assert ds.train.x.dtype == torch.float32 and ds.info["task"] == "regression"
    # z-scored with train+validation statistics
    trainval = torch.cat([ds.train.y, ds.val.y]).double()
    assert abs(trainval.mean().item()) < 1e-5 and abs(trainval.std().item() - 1) < 1e-5
    assert ds.info["y_std"] > 0


def test_energy_matches_seed_protocol(data_dir):
    fetch_dataset("uci_energy", from_dir=SHARED)  # the parent folder is accepted too
    ds = load_dataset("uci_energy")
    import numpy as np

    raw = np.loadtxt(SHARED / "uci" / "energy" / "data.txt")
    perm = np.loadtxt(SHARED / "uci" / "energy" / "permutation_indices.txt", dtype=int)
    y = raw[perm][:, 8]
    back = ds.test.y[:, 0].double() * ds.info["y_std"] + ds.info["y_mean"]
    assert np.allclose(back.numpy(), y[-76:], atol=1e-4)
    assert ds.info["y_mean"] == pytest.approx(y[:692].mean())
    assert load_dataset("uci_energy", val_size=100).sizes() == (592, 100, 76)


def test_missing_cache_names_the_fetch_command(data_dir):
    with pytest.raises(DataMissingError, match="bilevel data fetch uci_yacht"):
        load_dataset("uci_yacht")


def test_corrupted_file_refused_and_old_cache_kept(data_dir, tmp_path):
    fetch_dataset("uci_yacht", from_dir=SHARED / "uci")
    before = (data_dir / "uci_yacht" / "arrays.npz").read_bytes()
    bad = tmp_path / "bad"
    shutil.copytree(SHARED / "uci" / "yacht", bad / "yacht")
    (bad / "yacht" / "data.txt").chmod(0o644)
    with open(bad / "yacht" / "data.txt", "a") as f:
        f.write("0 0 0 0 0 0 0\n")
    with pytest.raises(DataVerificationError, match="sha256"):
        fetch_dataset("uci_yacht", from_dir=bad)
    assert (data_dir / "uci_yacht" / "arrays.npz").read_bytes() == before
    assert not [p for p in (data_dir / "uci_yacht").iterdir() if p.name.startswith(".")]


def test_verify_detects_a_tampered_cache(data_dir):
    fetch_dataset("uci_yacht", from_dir=SHARED / "uci")
    manifest = data_dir / "uci_yacht" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["arrays"]["y"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataVerificationError, match="differ"):
        verify_dataset("uci_yacht")
