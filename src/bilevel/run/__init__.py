"""Run infrastructure: config loading and schema, run directories, metrics, checkpoints.

Recipes import from here; nothing here imports a recipe.
"""

from bilevel.run.checkpoint import CheckpointStore, CheckpointWriteError
from bilevel.run.config import RawConfig, changed_keys, config_hash, load_layers, validate
from bilevel.run.lock import RunLock, RunLockedError
from bilevel.run.methods import (
    Backprop,
    Checkpointed,
    Forward,
    Greedy,
    HypergradConfig,
    Implicit,
    OnePass,
    Truncated,
    Unrolled,
)
from bilevel.run.metrics import read_metrics
from bilevel.run.nan import all_finite, on_nonfinite
from bilevel.run.rundir import Checkpoint, RunDir, RunInterrupted
from bilevel.run.schema import (
    AbortRunConfig,
    CheckpointConfig,
    DataConfig,
    HParamConfig,
    InnerOptimConfig,
    LoggingConfig,
    MLPConfig,
    ModelConfig,
    OuterOptimConfig,
    RunConfig,
    Section,
    SGDConfig,
    SkipOrAbortRunConfig,
)
from bilevel.run.seeding import (
    capture_rng,
    configure_determinism,
    resolve_device,
    restore_rng,
    seed_everything,
)
from bilevel.run.state import Accessor, RunState

__all__ = [
    "AbortRunConfig",
    "Accessor",
    "Backprop",
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointStore",
    "CheckpointWriteError",
    "Checkpointed",
    "DataConfig",
    "Forward",
    "Greedy",
    "HParamConfig",
    "HypergradConfig",
    "Implicit",
    "InnerOptimConfig",
    "LoggingConfig",
    "MLPConfig",
    "ModelConfig",
    "OnePass",
    "OuterOptimConfig",
    "RawConfig",
    "RunConfig",
    "RunDir",
    "RunInterrupted",
    "RunLock",
    "RunLockedError",
    "RunState",
    "SGDConfig",
    "Section",
    "SkipOrAbortRunConfig",
    "Truncated",
    "Unrolled",
    "all_finite",
    "capture_rng",
    "changed_keys",
    "config_hash",
    "configure_determinism",
    "load_layers",
    "on_nonfinite",
    "read_metrics",
    "resolve_device",
    "restore_rng",
    "seed_everything",
    "validate",
]
