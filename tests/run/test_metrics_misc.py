"""metrics.jsonl, TensorBoard sink, progress bar switch, non-finite policy helper."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from bilevel.errors import NonFiniteError
from bilevel.run import all_finite, on_nonfinite, read_metrics
from bilevel.run.metrics import TB_NOTICE, MetricsWriter, truncate_metrics
from bilevel.run.progress import progress_enabled


def test_full_precision_roundtrip_and_truncate(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "m.jsonl")
    x = 1 / 3 + 1e-17
    w.write(1, {"a": x, "t": torch.tensor(0.1, dtype=torch.float64), "n": math.nan})
    offset = w.sync()
    w.write(2, {"a": 2.0})
    w.close()
    recs = read_metrics(tmp_path / "m.jsonl")
    assert recs[0]["a"] == x and recs[0]["t"] == 0.1 and math.isnan(recs[0]["n"])
    truncate_metrics(tmp_path / "m.jsonl", offset)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1]


def test_torn_last_line_skipped_corrupt_middle_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    with pytest.warns(RuntimeWarning, match="torn"):
        assert read_metrics(path) == [{"step": 1, "a": 1.0}]
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="corrupt"):
        read_metrics(path)


def test_tensorboard_events_written(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    w = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    w.write(1, {"loss": 0.5})
    w.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_missing_prints_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    w = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    w.write(1, {"loss": 0.5})
    w.close()
    assert capsys.readouterr().err.strip() == TB_NOTICE
    assert read_metrics(tmp_path / "m.jsonl")[0]["loss"] == 0.5


def test_progress_quiet_in_ci_and_without_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress_enabled(True) and not progress_enabled(False)
    monkeypatch.setenv("CI", "1")
    assert not progress_enabled(True)
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress_enabled(True)


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict[str, object]]] = []

    def event(self, step: int, kind: str, **info: object) -> None:
        self.events.append((step, kind, info))


def test_nonfinite_policy() -> None:
    assert all_finite({"a": torch.ones(2)}) and not all_finite(torch.tensor([1.0, math.inf]))
    sink = Sink()
    assert on_nonfinite(sink, "skip", step=3, what="hypergradient") == "skip"
    assert on_nonfinite(sink, "rollback", step=4, what="hypergradient") == "rollback"
    with pytest.raises(NonFiniteError, match="after 5 rollbacks"):
        on_nonfinite(sink, "rollback", step=5, what="hypergradient", rollbacks=5)
    with pytest.raises(NonFiniteError, match="step 6"):
        on_nonfinite(sink, "abort", step=6, what="hypergradient")
    assert [e[0] for e in sink.events] == [3, 4, 5, 6]
    assert sink.events[-1][2]["action"] == "abort"
