"""Run infrastructure: config loading and schema, run directories, metrics, checkpoints.

Recipes import from here; nothing here imports a recipe.
"""

from bilevel.runs.checkpoint import CheckpointStore, CheckpointWriteError
from bilevel.runs.config import RawConfig, changed_keys, config_hash, load_layers, validate
from bilevel.runs.lock import RunLock, RunLockedError
from bilevel.runs.metrics import read_metrics
from bilevel.runs.nan import all_finite, on_nonfinite
from bilevel.runs.rundir import Checkpoint, RunDir, RunInterrupted
from bilevel.runs.schema import (
    CheckpointConfig,
    DataConfig,
    HParamConfig,
    HypergradConfig,
    InnerOptimConfig,
    LoggingConfig,
    ModelConfig,
    OuterOptimConfig,
    RunConfig,
    Section,
)
from bilevel.runs.seeding import (
    capture_rng,
    configure_determinism,
    resolve_device,
    restore_rng,
    seed_everything,
)

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointStore",
    "CheckpointWriteError",
    "DataConfig",
    "HParamConfig",
    "HypergradConfig",
    "InnerOptimConfig",
    "LoggingConfig",
    "ModelConfig",
    "OuterOptimConfig",
    "RawConfig",
    "RunConfig",
    "RunDir",
    "RunInterrupted",
    "RunLock",
    "RunLockedError",
    "Section",
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
