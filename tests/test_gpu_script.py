"""benchmarks/gpu.sh, the script a lent GPU runs, checked on the CPU with --dry-run: every
script, flag and config it uses exists, and it writes its results file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "results.md"
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for what in ("benchmarks/hypergrad.py --device cuda", "benchmarks/peers.py --device cuda",
                 "benchmarks/gtn.py"):
        assert what in text
    assert text.count("(dry run: checked, not run)") == 3


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_rejects_unknown_arguments():
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
