"""Fuzz ``bilevel config validate``: malformed configs and ``--set`` strings end in exit 0 or 2.

Hypothesis mutates a real config (values swapped for hostile ones, lines cut, bytes that are
not UTF-8, anchors and aliases, tags, deep nesting) and draws ``--set`` strings from real and
random keys. Each case runs the CLI's ``main`` in this process (milliseconds each); a few
fixed hostile cases also run as real ``bilevel`` processes. Bounds: :data:`EXAMPLES` cases,
each under :data:`DEADLINE_MS`, all under :data:`TOTAL_S` seconds, and the process grows by
less than :data:`GROWTH_MB` MB (an alias bomb, before the loader's limit, took 7 GB).
"""

from __future__ import annotations

import contextlib
import io
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bilevel.cli import main  # noqa: E402
from tests.cli.conftest import TINY, cli_env  # noqa: E402

EXAMPLES = 300
DEADLINE_MS = 3000
TOTAL_S = 60.0
GROWTH_MB = 400

KEYS = ["recipe", "data.name", "data.batch_size", "data.split_seed", "data.data_dir",
        "model.hidden", "model.dropout", "model.activation", "inner.lr", "inner.betas",
        "inner.momentum", "outer.lr", "outer.grad_clip", "hparam.low", "hparam.high",
        "hypergrad.steps", "hypergrad.truncate", "hypergrad.method", "run.seed", "run.device",
        "run.threads", "run.max_steps", "run.nan_policy", "logging.every", "checkpoint.every",
        "checkpoint.keep_last", "nope", "run", "model.hidden.0", "a..b", ".x", "x."]
HOSTILE = [".inf", "-.inf", ".nan", "1e9", "1e20", "100000000000000000000", "-1", "0", "-0.0",
           "[64, -1]", "[64, .nan]", "cuda:99", "mps", "cuda", "~", "null", "true", "off",
           "''", "'", '"', "{", "[[[[", "}", "]", "&a [1, *a]", "*undefined", "&a 1", "!!set {a}",
           "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGk=",
           "!!timestamp 2020-01-01", "!foo bar", "? [a]\n: 1", "{a: 1, a: 2}", "- x", ": :",
           "\t", "\x00", "\x07", "\ufeff", "1_000", "0x10", "0o7", "1e-3", "5E+2", "NaN", "Infinity",
           "[" * 200 + "]" * 200, "{a: " * 80 + "1" + "}" * 80, "x" * 5000, "%YAML 1.1\n---\n1",
           "--- 1\n--- 2", "[&a [1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a], "
           "&c [*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d]]"]

values = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40),
                   st.integers(min_value=-(2**70), max_value=2**70).map(str),
                   st.floats().map(repr))
set_strings = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), values),
    st.text(max_size=30),
)


@st.composite
def config_texts(draw: st.DrawFn) -> bytes:
    lines = TINY.splitlines()
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value", "insert", "delete", "cut"]))
        if op == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(values)}"
        elif op == "insert":
            lines.insert(i, f"{draw(st.sampled_from(KEYS)).split('.')[0]}: {draw(values)}")
        elif op == "delete":
            del lines[i]
        else:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    data = "\n".join(lines).encode()
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter: raw bytes somewhere
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data


def _validate(path: Path, sets: list[str]) -> tuple[int, str]:
    argv = ["config", "validate", str(path), *[f"--set={s}" for s in sets]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a malformed command line is exit 2
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


def test_fuzz_config_validate_exits_0_or_2(tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    seen = {0: 0, 2: 0}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=DEADLINE_MS, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(text=config_texts(), sets=st.lists(set_strings, max_size=3))
    def case(text: bytes, sets: list[str]) -> None:
        path.write_bytes(text)
        code, err = _validate(path, sets)
        assert code in (0, 2), (code, err)
        assert "Traceback" not in err
        if code == 2:
            assert err.strip(), "exit 2 without a message"
        seen[code] += 1

    case()
    seconds = time.monotonic() - t0
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert seconds < TOTAL_S and growth_mb < GROWTH_MB, (seconds, growth_mb)
    assert seen[0] > 0 and seen[2] > EXAMPLES // 2, seen  # it explored both outcomes


@pytest.mark.parametrize("sets", [
    ["inner.lr=.inf", "run.threads=100000"],
    ["model.hidden=" + HOSTILE[-1]],
    ["x=" + "[" * 3000 + "]" * 3000],
    ["run=!!python/object/apply:os.system ['true']"],
    ["run.seed=100000000000000000000", "data.batch_size=1e9", "run.device=cuda:99"],
])
def test_hostile_sets_through_the_real_cli(tmp_path: Path, sets: list[str]) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    cmd = [sys.executable, "-m", "bilevel", "config", "validate", str(path),
           *[f"--set={s}" for s in sets]]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
