"""bilevel.optim.hyperparameters: transforms, granularities, clipping, errors, state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel.errors import ConfigError
from bilevel.optim.hyperparameters import TRANSFORMS, HParamSpec, Hyperparameters


@pytest.mark.parametrize(("name", "value"), [("log10", 3e-4), ("sigmoid", 0.9), ("softplus", 0.02),
                                             ("identity", -2.5)])
def test_transform_round_trip(name: str, value: float) -> None:
    t = TRANSFORMS[name]
    assert float(t.forward(torch.tensor(t.inverse(value), dtype=torch.float64))) == pytest.approx(value, rel=1e-12)


def test_values_differentiate_through_the_transform() -> None:
    hp = Hyperparameters({"lr": HParamSpec(init=1e-2, transform="log10")}, dtype=torch.float64)
    raw = hp.raw_tree()
    hp.values(raw)["lr"].backward()
    assert float(raw["lr"].grad) == pytest.approx(1e-2 * math.log(10))


def test_per_tensor_and_per_element_shapes_and_constants() -> None:
    like = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    hp = Hyperparameters({"lr": HParamSpec(init=0.1, transform="log10", granularity="element"),
                          "wd": HParamSpec(init=1e-3, transform="log10", granularity="tensor"),
                          "m": HParamSpec(init=0.5, transform="sigmoid", learn=False)}, like=like)
    raw = hp.raw_tree()
    assert set(raw) == {"lr", "wd"} and raw["lr"]["a.weight"].shape == (2, 3)
    assert raw["wd"]["a.bias"].shape == ()
    v = hp.values(raw)
    torch.testing.assert_close(v["lr"]["a.bias"], torch.full((2,), 0.1))
    assert not v["m"].requires_grad and float(v["m"]) == pytest.approx(0.5)
    assert len(hp.learned()) == 4
    summary = hp.summary()
    assert summary["lr_q50"] == pytest.approx(0.1) and summary["m"] == pytest.approx(0.5)


def test_clip_and_shift_and_state_dict() -> None:
    hp = Hyperparameters({"lr": HParamSpec(init=0.5, transform="log10", low=-10.0, high=0.0)})
    hp.shift_("lr", 1.0)  # x10 would be 5, clipped to 1
    assert float(hp.values()["lr"]) == pytest.approx(1.0)
    other = Hyperparameters({"lr": HParamSpec(init=1e-3, transform="log10", low=-10.0, high=0.0)})
    other.load_state_dict(hp.state_dict())
    assert float(other.values()["lr"]) == pytest.approx(1.0)


def test_errors_name_the_hyperparameter() -> None:
    with pytest.raises(ConfigError, match=r"'momentum' = 1\.5.*sigmoid"):
        Hyperparameters({"momentum": HParamSpec(init=1.5, transform="sigmoid")})
    with pytest.raises(ConfigError, match="unknown transform 'exp'"):
        Hyperparameters({"lr": HParamSpec(init=1.0, transform="exp")})
    with pytest.raises(ConfigError, match="like="):
        Hyperparameters({"lr": HParamSpec(init=1.0, granularity="element")})
