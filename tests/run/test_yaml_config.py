"""The strict YAML loader and pydantic error formatting."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilevel.errors import ConfigError
from bilevel.run import RunConfig, Section, load_layers, validate
from bilevel.run.config import changed_keys, config_hash
from bilevel.run.methods import Backprop, HypergradConfig, Unrolled
from bilevel.run.schema import InnerOptimConfig
from bilevel.run.yamlio import parse_yaml


class Cfg(Section):
    inner: InnerOptimConfig = InnerOptimConfig()
    hypergrad: HypergradConfig = Unrolled()
    run: RunConfig


class BackpropOnly(Section):
    hypergrad: Backprop = Unrolled()


def _error(model: type[Section], path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        validate(model, load_layers([path]))
    return str(info.value)


def test_scientific_floats_and_strict_booleans() -> None:
    data, sources = parse_yaml("a: 1e-3\nb: -2E+2\nc: off\nd: true\ne: 10\nf: 1.0e-3\n", where="x")
    assert data == {"a": 0.001, "b": -200.0, "c": "off", "d": True, "e": 10, "f": 0.001}
    assert sources["c"] == "x:3"


def test_nested_sources_and_lists() -> None:
    _, sources = parse_yaml("m:\n  hidden:\n    - 4\n    - 8\n", where="f.yaml")
    assert sources == {"m": "f.yaml:1", "m.hidden": "f.yaml:2", "m.hidden.0": "f.yaml:3",
                       "m.hidden.1": "f.yaml:4"}


def test_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError, match=r"f.yaml:3: invalid YAML"):
        parse_yaml("a: 1\nb: [1, 2\nc: 3\n", where="f.yaml")


def test_layers_merge_and_track_sources(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("inner:\n  lr: 0.1\n  momentum: 0.5\nrun: {max_steps: 3}\n")
    (tmp_path / "b.yaml").write_text("inner:\n  lr: 0.2\n")
    raw = load_layers([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["inner.momentum=0.9"])
    assert raw.data["inner"] == {"lr": 0.2, "momentum": 0.9}
    assert raw.sources["inner.lr"] == f"{tmp_path / 'b.yaml'}:2"
    assert raw.sources["inner.momentum"] == "--set inner.momentum=0.9"
    cfg = validate(Cfg, raw)
    assert cfg.inner.lr == 0.2 and cfg.run.max_steps == 3


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_layers([], ["inner.lr"])


def test_errors_collected_with_key_line_value_and_allowed(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("inner:\n  lr: -1\n  momentum: 1.5\nhypergrad:\n"
                                     "  method: magic\n  stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        validate(Cfg, load_layers([tmp_path / "c.yaml"]))
    msg = str(info.value)
    assert "4 problems" in msg
    assert f"inner.lr = -1 ({tmp_path / 'c.yaml'}:2): Input should be greater than 0" in msg
    assert "inner.momentum = 1.5" in msg and "less than 1" in msg
    assert "hypergrad.method = 'magic'" in msg and "'greedy'" in msg
    assert "run (not set in any file): required key is missing" in msg
    (tmp_path / "d.yaml").write_text("hypergrad:\n  method: unrolled\n  stepz: 3\n")
    msg = _error(Cfg, tmp_path / "d.yaml")
    assert f"hypergrad.stepz ({tmp_path / 'd.yaml'}:3): unknown key (did you mean 'steps'?); " \
           "allowed keys: method, steps" in msg


def test_a_method_the_recipe_does_not_support_is_a_key_error(tmp_path: Path) -> None:
    # One section per method: a recipe's union names what it honours, a method's section
    # only its own keys (issue 18), and the message names the key and line, not the union.
    (tmp_path / "e.yaml").write_text("hypergrad:\n  method: implicit\n")
    msg = _error(BackpropOnly, tmp_path / "e.yaml")
    assert f"hypergrad.method = 'implicit' ({tmp_path / 'e.yaml'}:2)" in msg
    assert "'unrolled', 'checkpointed', 'truncated'" in msg
    (tmp_path / "f.yaml").write_text("hypergrad:\n  method: unrolled\n  solver: cg\n")
    msg = _error(BackpropOnly, tmp_path / "f.yaml")
    assert f"hypergrad.solver ({tmp_path / 'f.yaml'}:3): unknown key" in msg
    assert "allowed keys: method, steps" in msg


def test_cross_field_rule() -> None:
    with pytest.raises(ConfigError, match="truncate"):
        validate(Cfg, load_layers([], ["run.max_steps=1", "hypergrad.method=truncated",
                                       "hypergrad.steps=2", "hypergrad.truncate=5"]))


def test_hash_and_changed_keys() -> None:
    a = {"inner": {"lr": 0.1}, "run": {"seed": 0}}
    b = {"inner": {"lr": 0.2}, "run": {"seed": 0}}
    assert config_hash(a) == config_hash({"run": {"seed": 0}, "inner": {"lr": 0.1}})
    assert config_hash(a) != config_hash(b)
    assert changed_keys(a, b) == ["inner.lr: 0.1 -> 0.2"]
