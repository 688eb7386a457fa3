"""Reusable config sections, one pydantic model per concern; recipes compose them.

Every section forbids unknown keys, so a typo (``mommentum``) is an error that names the
allowed keys rather than a silently ignored setting. A recipe's ``Config`` is a
:class:`Section` whose fields are these sections (plus its own options)::

    class Config(Section):
        data: DataConfig
        inner: InnerOptimConfig
        run: RunConfig
        checkpoint: CheckpointConfig = CheckpointConfig()
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    """Which data set, where it lives, how it is split and batched."""

    name: str = Field(description="data set name, e.g. 'diabetes', 'mnist'")
    data_dir: str | None = Field(None, description="cache directory (None: the default)")
    split_seed: int = Field(0, ge=0, description="seed of the fixed train/val/test split")
    batch_size: int = Field(32, gt=0, description="minibatch size of the inner problem")


class ModelConfig(Section):
    """The network trained by the inner problem."""

    name: str = Field("mlp", description="model name, e.g. 'mlp', 'linear', 'cnn'")
    hidden: list[int] = Field(default_factory=list, description="hidden widths of an MLP")
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class InnerOptimConfig(Section):
    """The update rule of the inner problem (initial values of learned hyperparameters)."""

    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw", "alig"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)


class OuterOptimConfig(Section):
    """The optimiser of the meta-parameters (the hyper-optimiser)."""

    name: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0, description="clip hypergradient norm")


class HParamConfig(Section):
    """What is learned about training: which hyperparameter, how it is stored and bounded."""

    name: Literal["lr", "weight_decay", "momentum"] = "lr"
    granularity: Literal["scalar", "tensor", "element"] = "scalar"
    transform: Literal["log10", "softplus", "sigmoid", "identity"] = "log10"
    low: float | None = Field(None, description="clip of the stored (unconstrained) value")
    high: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> HParamConfig:
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class HypergradConfig(Section):
    """How the hypergradient is computed (bilevel.hypergrad method and its options)."""

    method: Literal[
        "unrolled", "truncated", "checkpointed", "forward", "implicit", "one_pass", "greedy"
    ] = "greedy"
    steps: int = Field(1, gt=0, description="inner steps per hyper-step")
    truncate: int | None = Field(None, gt=0, description="steps kept by 'truncated'")
    solver: Literal["neumann", "cg", "identity", "exact"] = "neumann"
    iters: int = Field(5, gt=0, description="solver iterations of 'implicit'")
    alpha: float | None = Field(None, gt=0.0, description="Neumann step size")

    @model_validator(mode="after")
    def _truncate_fits(self) -> HypergradConfig:
        if self.truncate is not None and self.truncate > self.steps:
            raise ValueError(f"truncate ({self.truncate}) must be at most steps ({self.steps})")
        return self


class LoggingConfig(Section):
    """Where and how often metrics are written."""

    every: int = Field(1, gt=0, description="log metrics every N steps")
    tensorboard: bool = Field(True, description="also write TensorBoard events if installed")
    progress: bool = Field(True, description="show a progress bar on a terminal")


class CheckpointConfig(Section):
    """How often checkpoints are written and how many are kept."""

    every: int = Field(50, gt=0, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(3, gt=0, description="number of checkpoints kept")


class RunConfig(Section):
    """Seeding, device, determinism, non-finite policy and run length."""

    seed: int = Field(0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    deterministic: bool = True
    threads: int | None = Field(1, gt=0, description="torch.set_num_threads (None: leave)")
    nan_policy: Literal["skip", "rollback", "abort"] = "abort"
    max_steps: int = Field(gt=0)


# Keys that may change between a run and its resume (they do not change the trajectory).
RESUMABLE_CHANGES: tuple[str, ...] = (
    "run.max_steps", "logging.", "checkpoint.keep_last",
)
