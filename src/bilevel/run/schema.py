"""Reusable config sections, one pydantic model per concern; recipes compose them.

Every section forbids unknown keys, so a typo (``mommentum``) is an error that names the
allowed keys rather than a silently ignored setting. Every section also refuses ``nan`` and
``inf`` for any float (``allow_inf_nan=False``) and any integer outside int64 (torch's range),
so no value reaches torch that it would overflow on; sizes, seeds and thread counts have
explicit ranges below (:data:`MAX_SEED`, :data:`MAX_THREADS`, :data:`MAX_BATCH`,
:data:`MAX_WIDTH`). A recipe's ``Config`` is a
:class:`Section` whose fields are these sections (plus its own options)::

    class Config(Section):
        data: DataConfig
        inner: InnerOptimConfig
        run: RunConfig
        checkpoint: CheckpointConfig = CheckpointConfig()
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64 = (-(2**63), 2**63 - 1)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most 2**64 - 1; int64 keeps numpy happy too
MAX_THREADS = 1024  # torch.set_num_threads(100000) segfaults
MAX_BATCH = 2**20  # a minibatch of more rows is a typo (1e9 allocates until killed)
MAX_WIDTH = 2**20  # widest hidden layer

Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _int64(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return INT64[0] <= value <= INT64[1]
    if isinstance(value, (list, tuple)):
        return all(_int64(v) for v in value)
    return True


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen, floats are
    finite and integers fit in int64."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        if not _int64(value):
            raise ValueError(f"integers must lie in [{INT64[0]}, {INT64[1]}]")
        return value


class DataConfig(Section):
    """Which data set, where it lives, how it is split and batched."""

    name: str = Field(description="data set name, e.g. 'diabetes', 'mnist'")
    data_dir: str | None = Field(None, description="cache directory (None: the default)")
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the fixed split")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="inner minibatch size")


class ModelConfig(Section):
    """The network trained by the inner problem."""

    name: str = Field("mlp", description="model name, e.g. 'mlp', 'linear', 'cnn'")
    hidden: list[Width] = Field(default_factory=list, max_length=64,
                                description="hidden widths of an MLP")
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class MLPConfig(Section):
    """An MLP (:class:`bilevel.models.MLP`), for recipes that build nothing else."""

    name: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field(default_factory=list, max_length=64)
    activation: Literal["relu", "tanh", "gelu"] = "relu"


class SGDConfig(Section):
    """``torch.optim.SGD``'s settings, for recipes whose inner rule is SGD and nothing else
    (``momentum`` 0: plain SGD; coupled weight decay)."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class InnerOptimConfig(Section):
    """The update rule of the inner problem (initial values of learned hyperparameters)."""

    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw", "alig"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)


class OuterOptimConfig(Section):
    """The optimiser of the meta-parameters (the hyper-optimiser)."""

    name: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0, description="clip hypergradient norm")

    def make(self, params: Any) -> Any:
        """``torch.optim.Adam`` or plain ``torch.optim.SGD`` over ``params`` at ``lr``
        (``grad_clip`` is applied where the hypergradient is written, not here)."""
        import torch

        return (torch.optim.Adam if self.name == "adam" else torch.optim.SGD)(params, lr=self.lr)


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

    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    deterministic: bool = True
    threads: int | None = Field(1, gt=0, le=MAX_THREADS,
                                description="torch.set_num_threads (None: leave)")
    nan_policy: Literal["skip", "rollback", "abort"] = "abort"
    max_steps: int = Field(gt=0)

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str) -> str:
        """A device this torch build has (``cuda:99`` fails here, not deep inside a run)."""
        import torch

        kind, _, index = device.partition(":")
        if kind == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError("no CUDA device on this machine/torch build; use auto or cpu")
            if index and int(index) >= count:
                raise ValueError(f"this machine has {count} CUDA device(s): cuda:0"
                                 f"{f'..cuda:{count - 1}' if count > 1 else ''}")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine/torch build; use auto or cpu")
        return device


class SkipOrAbortRunConfig(RunConfig):
    """:class:`RunConfig` for recipes with nothing to roll back to: ``nan_policy`` is
    ``skip`` (drop the update) or ``abort``."""

    nan_policy: Literal["skip", "abort"] = "abort"


class AbortRunConfig(RunConfig):
    """:class:`RunConfig` for recipes that stop on a non-finite value (exit 1): ``nan_policy``
    is ``abort`` only, so ``skip`` is an error rather than a setting silently ignored."""

    nan_policy: Literal["abort"] = "abort"


# Keys that may change between a run and its resume (they do not change the trajectory).
RESUMABLE_CHANGES: tuple[str, ...] = (
    "run.max_steps", "logging.", "checkpoint.keep_last",
)
