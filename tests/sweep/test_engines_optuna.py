"""Optuna engine: study creation survives workers that start together on a new SQLite file,
a sweep is reproducible from --seed (trial t starts from initialisation t, later proposals
seeded by (seed, trial number)), and it writes best.json like the local engine."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.data import fetch_dataset
from bilevel.recipes.onepass.recipe import SEARCH_SPACE
from bilevel.sweep.schedulers import Space
from tests.conftest import REPO, shared_data_dir

optuna = pytest.importorskip("optuna")
sqlalchemy = pytest.importorskip("sqlalchemy")

from bilevel.sweep.engines import optuna_engine  # noqa: E402
from bilevel.sweep.scheduled import scheduled_sweep  # noqa: E402

BASE = ["onepass/uci_energy.yaml"]
ALGO = ["onepass/random_validation.yaml"]
SETS = ["logging.progress=false", "checkpoint.every=1"]
SEARCH = ["inner.lr", "inner.weight_decay", "inner.momentum"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    fetch_dataset("uci_energy", d, from_dir=shared_data_dir())
    return d


@pytest.fixture
def uci(tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_DATA", str(data_dir))  # subprocesses inherit it


def test_open_study_retries_the_schema_race_and_nothing_else(tmp_path, monkeypatch):
    real, calls = optuna.create_study, []

    def racing(**kw):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError(
                "INSERT INTO alembic_version", {}, Exception(
                    "UNIQUE constraint failed: alembic_version.version_num"))
        if len(calls) == 2:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE", {}, Exception("table study_directions already exists"))
        return real(**kw)

    monkeypatch.setattr(optuna, "create_study", racing)
    study = optuna_engine.open_study(storage=f"sqlite:///{tmp_path}/s.db", root=tmp_path,
                                     study_name="s", wait=0.0)
    assert len(calls) == 3 and study.study_name == "s"

    def broken(**kw):
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna, "create_study", broken)
    calls.clear()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O"):
        optuna_engine.open_study(storage=f"sqlite:///{tmp_path}/t.db", root=tmp_path,
                                 study_name="s", wait=0.0)
    assert len(calls) == 1  # not a race: not retried


def _open_together(root: str, reps: int, barrier, errors) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from bilevel.sweep.engines.optuna_engine import open_study

    for rep in range(reps):
        barrier.wait()  # every worker creates the same new file at the same moment
        try:
            open_study(storage=f"sqlite:///{root}/{rep}.db", root=Path(root), study_name="s")
        except Exception as exc:
            errors.put(f"rep {rep}: {type(exc).__name__}: {str(exc)[:200]}")


def test_workers_starting_together_on_a_new_sqlite_file_open_one_study(tmp_path):
    # Without the retry this fails in nearly every rep (Optuna 5.1: "table ... already
    # exists" / "UNIQUE constraint failed: alembic_version.version_num").
    ctx = multiprocessing.get_context("spawn")
    reps, n = 5, 2
    barrier, errors = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_together, args=(str(tmp_path), reps, barrier, errors))
             for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found
    for rep in range(reps):
        studies = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/{rep}.db")
        assert [s.study_name for s in studies] == ["s"]


def _sweep(out: Path, **kw):
    return scheduled_sweep(BASE, ALGO, scheduler="bo", engine="optuna", out=out,
                           overrides=SETS, search=SEARCH, **kw)


def test_optuna_engine_is_reproducible_from_the_seed_and_writes_best(tmp_path, uci,
                                                                    monkeypatch):
    real = optuna_engine.worker
    monkeypatch.setattr(optuna_engine, "worker", lambda **kw: real(**kw, startup=2))
    kw = {"trials": 4, "max_resource": 10, "seed": 3}
    a, b = _sweep(tmp_path / "a", **kw), _sweep(tmp_path / "b", **kw)
    c = _sweep(tmp_path / "c", **{**kw, "seed": 4})

    def proposals(out: Path) -> list[dict[str, float]]:
        study = optuna.load_study(study_name="random_validation-bo", storage=(
            optuna_engine.storage_for(None, out / "random_validation/bo")))
        return [t.params for t in study.get_trials()]

    pa, pb, pc = proposals(tmp_path / "a"), proposals(tmp_path / "b"), proposals(tmp_path / "c")
    assert len(pa) == 4 and pa == pb and pa != pc
    space = Space.from_dict({k: SEARCH_SPACE[k] for k in SEARCH})
    for t in range(2):  # trial t starts from initialisation t, as on the local engine
        assert pa[t] == pytest.approx(space.draw(t, seed=3))
    assert pa[2] != pytest.approx(space.draw(2, seed=3))  # then the seeded sampler proposes
    best_a, best_b = a["random_validation"]["best"], b["random_validation"]["best"]
    assert best_a["value"] == best_b["value"] and best_a["job"] == best_b["job"]
    assert c["random_validation"]["best"]["value"] != best_a["value"]
    written = json.loads((tmp_path / "a/random_validation/bo/best.json").read_text())
    assert written["best"]["value"] == best_a["value"]
    assert written["totals"]["jobs"] == 4 and written["totals"]["trial_steps"] == 40
    assert "bilevel run" in written["best"]["replay"]
    assert written["best"]["summary"]["val/loss"] == best_a["value"]


@pytest.mark.slow
def test_two_cli_workers_start_together_on_a_new_sqlite_study(tmp_path, uci):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BILEVEL_FAULT", None)
    cmd = [sys.executable, "-m", "bilevel", "sweep", *BASE, "-a", *ALGO, "--engine", "optuna",
           "--scheduler", "bo", "--trials", "3", "--max-resource", "10", "--storage",
           f"sqlite:///{tmp_path}/new.db", "--out", "o", "--search", ",".join(SEARCH),
           *(a for s in SETS for a in ("--set", s))]
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=180) for w in workers]
    for w, (out, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err[-2000:]
        assert "random_validation: best val/loss =" in out  # the engine's result is printed
    study = optuna.load_study(study_name="random_validation-bo",
                              storage=f"sqlite:///{tmp_path}/new.db")
    assert sum(t.state.name == "COMPLETE" for t in study.get_trials()) >= 3
    assert Path("o/random_validation/bo/best.json").is_file()


def test_a_cause_every_trial_shares_stops_an_optuna_worker_and_the_rerun_finishes(
        tmp_path, data_dir):
    empty = tmp_path / "empty-data"
    cmd = [sys.executable, "-m", "bilevel", "sweep", *BASE, "-a", *ALGO, "--engine", "optuna",
           "--scheduler", "bo", "--trials", "2", "--max-resource", "10", "--out",
           str(tmp_path / "o"), "--search", ",".join(SEARCH),
           *(a for s in SETS for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BILEVEL_DATA": str(empty)}
    env.pop("BILEVEL_FAULT", None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "this worker stopped" in r.stderr and "Traceback" not in r.stderr
    fetch_dataset("uci_energy", empty, from_dir=shared_data_dir())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    study = optuna.load_study(study_name="random_validation-bo", storage=(
        optuna_engine.storage_for(None, tmp_path / "o/random_validation/bo")))
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["index"] for t in done) == [0, 1]  # the stopped one, rerun
