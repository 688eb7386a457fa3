"""Second reliability audit (issue 16), through the real CLI: each test failed before its fix."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bilevel.cli import main
from tests.cli.conftest import cli_env, run_cli

# -- item 1: a refused resume leaves the live run alone (two processes) ---------------------

LIVE = """
import sys
from pathlib import Path
from bilevel.recipes import resolve
from bilevel.run import RunDir
_, _, resolved = resolve([sys.argv[1]])
resolved.pop("recipe")
run_dir = RunDir.create(sys.argv[2], resolved, recipe="toy_hyperlr")
with run_dir:
    half = Path(sys.argv[2]) / "checkpoints" / f".step-00000001.pt.tmp-{__import__('os').getpid()}"
    half.write_bytes(b"half of a checkpoint")  # what a live run has while it writes one
    print("running", flush=True)
    sys.stdin.readline()
    print("intact" if half.exists() else "deleted", flush=True)
"""


def test_refused_resume_does_not_touch_the_live_run(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    live = subprocess.Popen([sys.executable, "-c", LIVE, str(tiny), str(out)], env=cli_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert live.stdin is not None and live.stdout is not None
    try:
        assert live.stdout.readline().strip() == "running"
        before = {p: p.read_bytes() for p in (out / "run.json", out / "config.yaml")}
        for _ in range(2):
            r = run_cli("resume", out, "--set", "run.max_steps=50", "--allow-config-change")
            assert r.code == 2 and f"in use by process {live.pid}" in r.err, r
        assert {p: p.read_bytes() for p in before} == before  # nothing rewritten either
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "intact"
    finally:
        live.stdin.close()
        live.wait(60)
        live.stdout.close()
    assert live.returncode == 0


# -- item 9: SIGTERM is handled like SIGINT (with a refused resume of the real run) ---------

def test_sigterm_checkpoints_marks_interrupted_and_exits_143(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bilevel", "run", str(tiny), "--out", str(out),
           "--set", "run.max_steps=1000000", "--set", "checkpoint.every=1"]
    proc = subprocess.Popen(cmd, env=cli_env(), stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size < 3000):
        time.sleep(0.05)
    for _ in range(2):  # refused while it writes a checkpoint every step; it must live on
        r = run_cli("resume", out)
        assert r.code == 2 and "in use by process" in r.err, r
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "checkpoint written" in err and "Traceback" not in err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not (out / "lock").exists()
    stopped = json.loads((out / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    r = run_cli("resume", out, "--set", f"run.max_steps={stopped[-1]['step'] + 2}",
                "--allow-config-change")
    assert r.code == 0, r


# -- item 2: YAML alias bomb and tags -------------------------------------------------------

def _bomb(levels: int = 9, width: int = 9) -> str:
    text = "a: &a [" + ",".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ",".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * width) + "]\n"
    return text


PARSE = """
import sys
from bilevel.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("via", ["file", "set"])
def test_alias_bomb_refused_fast_with_little_memory(tmp_path: Path, tiny: Path, via: str) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("recipe: toy_hyperlr\n" + _bomb())
    assert len(bomb.read_bytes()) < 700
    flow = "{" + _bomb().strip().replace("\n", ", ") + "}"
    args = [str(bomb)] if via == "file" else [str(tiny), "--set", f"model.x={flow}"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PARSE, "config", "validate", *args],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert proc.returncode == 2, proc.stderr
    assert "expands to more than 100000 values" in proc.stderr and "Traceback" not in proc.stderr
    where = f"{bomb}:" if via == "file" else "--set model.x="
    assert where in proc.stderr
    assert seconds < 60 and peak_mb < 1500, (seconds, peak_mb)  # was 7 GB and > 120 s


def test_python_tags_refused_and_never_run(tmp_path: Path, tiny: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(tiny.read_text() + f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["config", "validate", str(evil)]) == 2
    assert "python/object/apply" in capsys.readouterr().err and not marker.exists()
    assert main(["config", "validate", str(tiny), "--set",
                 f"model.hidden=!!python/object/apply:os.system ['touch {marker}']"]) == 2
    assert "not allowed" in capsys.readouterr().err and not marker.exists()


# -- item 7: validation gaps end in exit 2 naming the key, never a traceback ----------------

@pytest.mark.parametrize(("override", "expected"), [
    ("inner.lr=.inf", "inner.lr"),
    ("model.hidden=[64,-1]", "model.hidden.1"),
    ("run.device=cuda:99", "run.device"),
    ("data.batch_size=1e9", "data.batch_size"),
    ("run.seed=1e20", "run.seed"),
    ("run.seed=100000000000000000000", "run.seed"),
    ("run.threads=100000", "run.threads"),
    ("hparam.high=.nan", "hparam.high"),
    ("x=" + "[" * 3000 + "]" * 3000, "nested more than"),
])
def test_bad_values_exit_2_naming_the_key(tiny: Path, override: str, expected: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if override.startswith("run.device") and __import__("torch").cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    assert main(["config", "validate", str(tiny), "--set", override]) == 2
    assert expected in capsys.readouterr().err


def test_non_utf8_and_deep_config_files_exit_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"recipe: toy_hyperlr\n# caf\xe9\n")
    assert main(["config", "validate", str(latin)]) == 2
    assert f"{latin}:2: not UTF-8" in capsys.readouterr().err
    deep = tmp_path / "deep.yaml"
    deep.write_text("recipe: toy_hyperlr\nx: " + "[" * 3000 + "]" * 3000 + "\n")
    assert main(["config", "validate", str(deep)]) == 2
    assert "nested more than" in capsys.readouterr().err


def test_bad_out_paths_exit_2(tiny: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    for out in (regular, regular / "sub", Path("/proc/bilevel-run"), Path("/sys/bilevel-run")):
        assert main(["run", str(tiny), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert f"--out {out}" in err, err


def test_read_only_file_system_is_a_clear_error(tiny: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import bilevel.recipes._registry as registry

    def erofs(*_a: object, **_k: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "data"))

    monkeypatch.setattr(registry, "_execute", erofs)  # e.g. a read-only data cache
    assert main(["run", str(tiny), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data'}: Read-only file system" in err and "Traceback" not in err


# -- item 9: a file-size limit fails the run cleanly ----------------------------------------

def test_file_size_limit_fails_the_run_and_releases_the_lock(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    r = run_cli("run", tiny, "--out", out, "--set", "run.max_steps=100000",
                "--set", "checkpoint.every=100000", "--set", "logging.tensorboard=true",
                env=cli_env(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=limit)
    assert r.code == 1, r  # was killed by SIGXFSZ with status "running"
    assert "File too large" in r.err and "Traceback" not in r.err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "lock").exists()
