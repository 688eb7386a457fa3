"""Engines on the real onepass recipe (UCI Energy, tiny budgets): ASHA promotions equal plain
runs, PBT exploits copy the donor's checkpoint, a killed local sweep resumes without redoing
finished jobs, Optuna BO resumes, and two Optuna workers share a study past a killed one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilevel.data import fetch_dataset
from bilevel.recipes import start
from bilevel.sweep.engines import warm_start
from bilevel.sweep.engines.local_engine import Ledger
from bilevel.sweep.scheduled import scheduled_sweep
from bilevel.sweep.schedulers import Space
from tests.cli.conftest import cli_env
from tests.conftest import shared_data_dir

BASE = ["onepass/uci_energy.yaml"]
SETS = ["logging.progress=false", "checkpoint.every=1"]
SEARCH = ["inner.lr", "inner.weight_decay", "inner.momentum"]
TINY = {"search": SEARCH, "overrides": SETS, "trials": 4, "max_resource": 40,
        "min_resource": 10, "reduction_factor": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    shared = shared_data_dir()
    d = tmp_path_factory.mktemp("data")
    fetch_dataset("uci_energy", d, from_dir=shared)
    return d


@pytest.fixture(autouse=True)
def _uci(tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_DATA", str(data_dir))  # subprocesses inherit it


def _cli(*args: str, fault: str | None = None, wait: bool = True):
    env = cli_env(fault=fault)
    cmd = [sys.executable, "-m", "bilevel", "sweep", *BASE, *args,
           *(a for s in SETS for a in ("--set", s)), "--search", ",".join(SEARCH)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_asha_promotions_resume_runs_exactly_and_the_best_replays(tmp_path):
    report = scheduled_sweep(BASE, ["onepass/ours_wd_lr_m.yaml"], scheduler="asha",
                             out=tmp_path / "s", **TINY)
    best = report["ours_wd_lr_m"]["best"]
    kinds = [rec["job"]["kind"] for rec in Ledger(tmp_path / "s/ours_wd_lr_m/asha/ledger.jsonl")
             .jobs.values()]
    assert kinds.count("continue") >= 2 and best["job"]["budget"] == 40
    # The best trial reached 40 steps by resuming at 10 and 20; a plain run to 40 agrees.
    job = best["job"]
    sets = [*SETS, *(f"{k}={v!r}" for k, v in job["config"].items()),
            f"run.seed={job['trial']}", "run.max_steps=40"]
    _, summary = start([*BASE, "onepass/ours_wd_lr_m.yaml"], sets, out=tmp_path / "replay")
    assert summary["val/loss"] == best["value"]
    assert "bilevel run" in best["replay"] and "run.max_steps=40" in best["replay"]


def test_pbt_is_reproducible_across_pool_sizes_and_exploit_copies_the_donor(tmp_path):
    kw = {**TINY, "population": 4, "interval": 10, "max_resource": 20}
    a = scheduled_sweep(BASE, ["onepass/random_validation.yaml"], scheduler="pbt",
                        out=tmp_path / "a", parallel=1, **kw)
    b = scheduled_sweep(BASE, ["onepass/random_validation.yaml"], scheduler="pbt",
                        out=tmp_path / "b", parallel=2, **kw)
    la = Ledger(tmp_path / "a/random_validation/pbt/ledger.jsonl")
    lb = Ledger(tmp_path / "b/random_validation/pbt/ledger.jsonl")
    assert [r.value for r in la.results.values()] == [r.value for r in lb.results.values()]
    assert a["random_validation"]["best"]["value"] == b["random_validation"]["best"]["value"]
    exploit = next(r["job"] for r in la.jobs.values() if r["job"]["kind"] == "exploit")
    donor = tmp_path / f"a/random_validation/pbt/snapshots/job-{exploit['info']['donor_job']:04d}.pt"
    # Exploit + explore by hand: the donor's weights, the explored hyperparameters.
    new = {"inner.lr": 0.5, "inner.weight_decay": 1e-4, "inner.momentum": 0.25}
    sets = [*SETS, *(f"{k}={v}" for k, v in new.items()), "run.max_steps=20"]
    warm_start(donor, tmp_path / "w", [*BASE, "onepass/random_validation.yaml"], sets)
    ckpt = next((tmp_path / "w/checkpoints").glob("step-*.pt"))
    got = torch.load(ckpt, weights_only=True)
    want = torch.load(donor, weights_only=True)
    for k in want["state"]["w"]:
        assert torch.equal(got["state"]["w"][k], want["state"]["w"][k])
    hp = got["state"]["hp"]
    assert any(torch.allclose(v, torch.tensor(-0.30103), atol=1e-4) for v in hp.values())
    assert got["config"]["inner"]["lr"] == 0.5


def test_a_killed_local_sweep_resumes_without_redoing_finished_jobs(tmp_path):
    args = ["-a", "onepass/random_validation.yaml", "--scheduler", "asha", "--trials", "4",
            "--max-resource", "40", "--min-resource", "10", "--reduction-factor", "2"]
    killed = _cli(*args, "--out", "k", fault="hyper@6")
    assert killed.returncode == -9, killed.stderr[-2000:]
    ledger = Path("k/random_validation/asha/ledger.jsonl")
    before = Ledger(ledger)
    assert 0 < len(before.results) < len(before.jobs) + 1
    done = _cli(*args, "--out", "k")
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [json.loads(x)["result"]["job_id"] for x in ledger.read_text().splitlines()
           if '"result"' in x]
    assert len(ids) == len(set(ids))  # no job recorded twice
    whole = scheduled_sweep(BASE, ["onepass/random_validation.yaml"], scheduler="asha",
                            out=tmp_path / "whole", **TINY)
    after = Ledger(ledger)
    assert {i: r.value for i, r in after.results.items()} == {
        i: r.value for i, r in Ledger(tmp_path / "whole/random_validation/asha/ledger.jsonl")
        .results.items()}
    assert whole["random_validation"]["best"]["job"]["trial"] is not None


def test_optuna_bo_starts_from_the_inits_and_resumes_its_study(tmp_path):
    kw = {**TINY, "max_resource": 20}
    kw["trials"] = 3
    scheduled_sweep(BASE, ["onepass/random_validation.yaml"], scheduler="bo",
                    out=tmp_path / "bo", **kw)
    root = tmp_path / "bo/random_validation/bo"
    first = Ledger(root / "ledger.jsonl")
    space = Space.from_dict({k: v for k, v in __import__(
        "bilevel.recipes.onepass.recipe", fromlist=["SEARCH_SPACE"]).SEARCH_SPACE.items()
        if k in SEARCH})
    assert first.jobs[0]["job"]["config"] == pytest.approx(space.draw(0, seed=0))
    kw["trials"] = 4
    scheduled_sweep(BASE, ["onepass/random_validation.yaml"], scheduler="bo",
                    out=tmp_path / "bo", **kw)
    again = Ledger(root / "ledger.jsonl")
    assert len(again.results) == 4
    assert all(again.results[i].value == first.results[i].value for i in range(3))
    assert (root / "study.journal").is_file()


def test_two_optuna_workers_share_a_study_and_retry_a_killed_workers_trial(tmp_path):
    import optuna

    from bilevel.sweep.engines.optuna_engine import storage_for

    journal = str(tmp_path / "study.journal")
    args = ["-a", "onepass/random_validation.yaml", "--engine", "optuna", "--scheduler", "bo",
            "--trials", "4", "--max-resource", "30", "--storage", journal, "--out", "o"]
    killed = _cli(*args, fault="hyper@2")  # dies in trial 0 after its first checkpoint
    assert killed.returncode == -9, killed.stderr[-2000:]
    workers = [_cli(*args, wait=False) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="random_validation-bo",
                              storage=storage_for(journal, tmp_path))
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 4 and states[0] == "FAIL"
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state.name == "COMPLETE" and retry.user_attrs["path"].endswith("trial-0000")
    assert retry.params == trials[0].params
    paths = [t.user_attrs["path"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(paths)) == 4
    # The retry resumed the dead trial's run directory instead of starting it over.
    log = Path(retry.user_attrs["path"]) / "metrics.jsonl"
    assert json.loads(log.read_text().splitlines()[-1])["weight_steps"] == 30.0
