"""alig: train a classifier with AliG, SGD with a hand-tuned step schedule, or Adam.

Berrada et al. (ICML 2020; seeds.md §6): AliG sets its step size from the current loss,
``γ = min(loss / (‖g‖² + eps), max_lr)``, so it needs no decay schedule, and it regularises
with a constraint (the L2-ball projection ``optim.max_norm``) instead of weight decay. This
recipe trains one model on one data set with one optimiser so the three can be compared on
the same data order and initialisation (both come from ``run.seed``); ``bilevel alig sweep``
runs it over a grid of ``max_lr``/``lr`` values.

Loss: cross-entropy on the logits (no weight decay unless ``optim.weight_decay`` is set for
SGD/Adam). Logged every ``logging.every`` steps: ``train/batch_loss`` (mean minibatch loss
over the window), ``optim/lr`` (SGD/Adam: the scheduled lr; AliG: ``max_lr``) and for AliG
``alig/step_size``, ``alig/step_size_unclipped`` (last step) and ``alig/clipped`` (fraction of
steps in the window where ``max_lr`` was active). Every ``eval.every`` steps and at the end:
``train/loss`` and ``train/accuracy`` (full training set in eval mode, or its first
``eval.train_size`` rows), ``val/accuracy``, ``test/loss``, ``test/accuracy``,
``weights/norm``.

At the end, as the authors do, the weights with the best validation accuracy (over the
evaluations, the final one included) are reloaded and tested: ``best/step``,
``best/val_accuracy``, ``best/test_accuracy``, ``best/test_loss``. The other final metrics
are those of the final weights.

Divergence (a non-finite minibatch loss, e.g. SGD with lr 10): ``run.nan_policy: abort``
raises; ``skip`` ends training there (the weights cannot recover), records the step as
``train/diverged_step`` and reports the final metrics of the diverged weights.

Run it::

    bilevel data fetch mnist
    bilevel run alig/mnist_mlp_alig.yaml --out runs/alig/mnist-mlp-alig
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from bilevel.data import Dataset, IndexSampler, load_dataset
from bilevel.errors import ConfigError
from bilevel.models import MLP, CBRStudent
from bilevel.optim import AliG, l2_projection
from bilevel.run import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    RunDir,
    RunState,
    Section,
    SkipOrAbortRunConfig,
    on_nonfinite,
    resolve_device,
)
from bilevel.run.faults import kill_point
from bilevel.run.schema import Beta

CLASSIFICATION = ("mnist", "fashion_mnist", "mnist1d", "digits", "cifar10", "cifar100", "svhn")
SEQUENCE = ("repeat_copy",)  # generated tasks, trained with model.name: dnc


class OptimConfig(Section):
    """The optimiser. Keys that apply to ``name`` get its defaults; the others must be unset
    (or null), so a key meant for another optimiser is an error rather than ignored."""

    name: Literal["alig", "sgd", "adam", "adagrad", "rmsprop"] = "alig"
    max_lr: float | None = Field(None, gt=0.0, description="alig: step-size cap (null: none)")
    eps: float | None = Field(None, ge=0.0, description="alig: added to |g|^2 (1e-5)")
    adjusted_momentum: bool | None = Field(None, description="alig: PyTorch-like momentum")
    max_norm: float | None = Field(None, gt=0.0, description="alig: L2-ball radius (null: none)")
    lr: float | None = Field(None, gt=0.0, description="sgd (0.1), adam (1e-3), adagrad "
                             "(1e-2), rmsprop (1e-2): learning rate")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="alig, sgd (0.9)")
    nesterov: bool | None = Field(None, description="sgd: Nesterov momentum (false)")
    betas: tuple[Beta, Beta] | None = Field(None, description="adam (0.9, 0.999)")
    weight_decay: float | None = Field(None, ge=0.0, description="sgd, adam (0); alig: max_norm")
    decay_at: list[float] | None = Field(None, description="sgd: fractions of run.max_steps "
                                         "where lr is multiplied by decay_factor ([])")
    decay_factor: float | None = Field(None, gt=0.0, le=1.0, description="sgd (0.1)")
    clip_grad_norm: float | None = Field(None, gt=0.0, description="all: rescale the gradient "
                                         "to this global norm before the step (null: never)")

    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "alig": {"max_lr": 0.1, "eps": 1e-5, "adjusted_momentum": False, "max_norm": None,
                 "momentum": 0.9, "clip_grad_norm": None},
        "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                "decay_at": [], "decay_factor": 0.1, "clip_grad_norm": None},
        "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "clip_grad_norm": None},
        # TF1's defaults, as in the authors' DNC baselines (see build_optimizer).
        "adagrad": {"lr": 1e-2, "clip_grad_norm": None},
        "rmsprop": {"lr": 1e-2, "clip_grad_norm": None},
    }

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_name(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("name", "alig") not in cls.DEFAULTS:
            return data  # pydantic reports the bad name
        name = data.get("name", "alig")
        for key, value in data.items():
            if key != "name" and value is not None and key not in cls.DEFAULTS[name]:
                users = [n for n, keys in cls.DEFAULTS.items() if key in keys]
                fix = " (AliG's step-size cap is optim.max_lr)" if key == "lr" else ""
                raise ValueError(f"optim.{key} does not apply to optim.name={name!r}, only "
                                 f"to {'/'.join(users) or 'nothing'}; remove it{fix}")
        return {**cls.DEFAULTS[name], **data}

    @model_validator(mode="after")
    def _consistent(self) -> OptimConfig:
        if self.nesterov and not self.momentum:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        if any(not 0 < f < 1 for f in self.decay_at or []):
            raise ValueError(f"optim.decay_at holds fractions of run.max_steps in (0, 1), "
                             f"got {self.decay_at}")
        return self


class EvalConfig(Section):
    """How often and on how much data the full losses and accuracies are computed."""

    every: int = Field(100, gt=0, description="evaluate every N steps (and at the end)")
    train_size: int | None = Field(None, gt=0, description="training rows for train/loss "
                                   "(None: all)")


class Config(Section):
    """alig's config: data, model, optimiser, evaluation, run, logging, checkpoints."""

    data: DataConfig = DataConfig(name="mnist", batch_size=128)
    model: ModelConfig = ModelConfig(name="mlp", hidden=[256])
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    run: SkipOrAbortRunConfig  # nothing to roll back to: skip or abort
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("data")
    @classmethod
    def _classification(cls, v: DataConfig) -> DataConfig:
        if v.name not in CLASSIFICATION + SEQUENCE:
            raise ValueError(f"the alig recipe trains classifiers or the DNC; data.name must be "
                             f"one of {', '.join(CLASSIFICATION + SEQUENCE)}, got {v.name!r}")
        return v

    @model_validator(mode="after")
    def _task_fits_model(self) -> Config:
        if (self.data.name in SEQUENCE) != (self.model.name == "dnc"):
            raise ValueError(f"model.name: dnc goes with data.name: repeat_copy and only with it "
                             f"(got model.name={self.model.name!r}, data.name={self.data.name!r})")
        return self

    @field_validator("model")
    @classmethod
    def _model(cls, v: ModelConfig) -> ModelConfig:
        if v.name not in ("mlp", "cnn", "dnc"):
            raise ValueError(f"model.name must be 'mlp', 'cnn' or 'dnc', got {v.name!r}")
        if v.dropout != 0:
            raise ValueError("model.dropout is not supported by the alig recipe; set it to 0")
        if v.name != "mlp" and v.hidden:
            raise ValueError(f"model.hidden sets MLP widths; the {v.name} has none (the dnc's "
                             f"sizes are AliG's: 64 LSTM units, 16x16 memory, 4 read heads)")
        return v


def build_model(cfg: ModelConfig, info: dict[str, Any]) -> nn.Module:
    """An MLP on flattened inputs, or the CBR student CNN (images only), from ``info``."""
    shape, classes = tuple(info["input_shape"]), int(info["num_classes"])
    if cfg.name == "mlp":
        return MLP([int(torch.Size(shape).numel()), *cfg.hidden, classes], cfg.activation)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in (28, 32):
        raise ConfigError(f"model.name: cnn needs 28x28 or 32x32 images; data.name="
                          f"{info['name']} has inputs of shape {shape}. Use model.name: mlp.")
    return CBRStudent(shape[0], classes, image_size=shape[1])


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AliG (with its L2-ball projection), or torch SGD, Adam, Adagrad or RMSprop, over all
    parameters.

    Adagrad and RMSprop take TensorFlow 1's defaults, which the authors' DNC baselines ran
    with: Adagrad's accumulator starts at 0.1; RMSprop decays at 0.9 with eps 1e-10 (TF1
    also starts RMSprop's mean square at 1 rather than 0 and puts eps inside the root; we
    keep torch's zero start, so its first steps are larger than TF1's).
    """
    params, c = list(model.parameters()), cfg.model_dump()
    if cfg.name == "alig":
        return AliG(params, max_lr=c["max_lr"], momentum=c["momentum"], eps=c["eps"],
                    adjusted_momentum=c["adjusted_momentum"],
                    projection_fn=l2_projection(params, c["max_norm"]))
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"],
                               nesterov=c["nesterov"], weight_decay=c["weight_decay"])
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=c["lr"], initial_accumulator_value=0.1)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=c["lr"], alpha=0.9, eps=1e-10)
    return torch.optim.Adam(params, lr=c["lr"], betas=c["betas"], weight_decay=c["weight_decay"])


def scheduled_lr(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """SGD's step schedule at 1-based ``step``: ``lr · factor^(#fractions f, step > f·T)``."""
    passed = sum(step > f * max_steps for f in cfg.decay_at or [])
    return float(cfg.lr or 0.0) * float(cfg.decay_factor or 1.0) ** passed


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, train_size: int | None) -> dict[str, float]:
    """Full-set loss and accuracy in eval mode (train/, val/accuracy, test/), weight norm."""
    model.eval()
    out: dict[str, float] = {}
    for split, x, y in (("train", ds.train.x[:train_size], ds.train.y[:train_size]),
                        ("val", ds.val.x, ds.val.y), ("test", ds.test.x, ds.test.y)):
        logits = torch.cat([model(xb) for xb in x.split(2000)])  # [n, classes]
        if split != "val":
            out[f"{split}/loss"] = F.cross_entropy(logits, y).item()
        out[f"{split}/accuracy"] = (logits.argmax(1) == y).double().mean().item()
    out["weights/norm"] = torch.cat([p.reshape(-1) for p in model.parameters()]).norm().item()
    model.train()
    return out


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train for ``run.max_steps`` minibatch steps; return the final evaluation."""
    if config.data.name in SEQUENCE:
        from bilevel.recipes.alig.copy_task import run_repeat_copy

        return run_repeat_copy(config, run_dir)
    device = resolve_device(config.run.device)
    ds = load_dataset(config.data.name, config.data.data_dir, config.data.split_seed,
                      normalize=True).to(device)  # images: the set's mean/std; others as given
    model = build_model(config.model, ds.info).to(device)
    opt = build_optimizer(config.optim, model)
    alig_opt = opt if isinstance(opt, AliG) else None  # AliG's step needs the loss
    sampler = IndexSampler(len(ds.train), config.data.batch_size, seed=config.run.seed)
    window = torch.zeros(3, dtype=torch.float64)  # [loss sum, steps, clipped steps] since the last log
    best: dict[str, Any] = {"step": 0, "val": -1.0, "model": None}  # best validation accuracy
    state = RunState(model=model, optim=opt, sampler=sampler, window=window, best=best)
    start, T = run_dir.resume(state), config.run.max_steps
    model.train()
    diverged = None
    for step in run_dir.steps(start, T):
        if config.optim.name == "sgd":  # stateless schedule: resume needs nothing extra
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(config.optim, step, T)
        idx = next(sampler)
        kill_point("inner")  # crash tests (BILEVEL_FAULT=inner@n); a no-op otherwise
        loss = F.cross_entropy(model(ds.train.x[idx]), ds.train.y[idx])
        if not torch.isfinite(loss):
            on_nonfinite(run_dir, config.run.nan_policy, step=step, what="training loss")
            diverged = step  # skip: the weights blew up and cannot recover
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
        if alig_opt is not None:
            alig_opt.step(loss=loss.detach())
        else:
            opt.step()
        window += torch.tensor([loss.item(), 1.0, float(_clipped(alig_opt))], dtype=torch.float64)

        if step % config.logging.every == 0 or step == T:
            log_window(run_dir, step, window, opt, alig_opt)
        if step % config.eval.every == 0 and step != T:
            metrics = evaluate(model, ds, config.eval.train_size)
            _keep_best(best, step, metrics, model)
            run_dir.log(step, metrics)
        run_dir.checkpoint(step, state, force=step == T)

    final = evaluate(model, ds, config.eval.train_size)
    if diverged is None:
        final |= _best_model_metrics(best, T, final, model, ds, config.eval.train_size)
    if diverged is not None:
        final |= {"train/loss": float("nan"), "train/diverged_step": float(diverged)}
        run_dir.event(diverged, "diverged", what="training loss")
    run_dir.log(diverged or T, final)
    return final


def _keep_best(best: dict[str, Any], step: int, metrics: dict[str, float],
               model: nn.Module) -> None:
    """Remember the weights with the highest validation accuracy so far (earliest on ties)."""
    if metrics["val/accuracy"] > best["val"]:
        best.update(step=step, val=metrics["val/accuracy"],
                    model={k: v.detach().clone() for k, v in model.state_dict().items()})


def _best_model_metrics(best: dict[str, Any], step: int, final: dict[str, float],
                        model: nn.Module, ds: Dataset, train_size: int | None) -> dict[str, float]:
    """The authors' protocol: test the best-validation weights (the final ones count too).

    Returns ``best/step``, ``best/val_accuracy``, ``best/test_accuracy``, ``best/test_loss``;
    the model is left holding its final weights.
    """
    _keep_best(best, step, final, model)
    if best["step"] == step:
        m = final
    else:
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best["model"])
        m = evaluate(model, ds, train_size)
        model.load_state_dict(current)
    return {"best/step": float(best["step"]), "best/val_accuracy": m["val/accuracy"],
            "best/test_accuracy": m["test/accuracy"], "best/test_loss": m["test/loss"]}


def log_window(run_dir: RunDir, step: int, window: torch.Tensor, opt: torch.optim.Optimizer,
               alig_opt: AliG | None) -> None:
    """Log the mean batch loss since the last log (``window`` = [loss sum, count, clipped
    count]), the lr and AliG's step sizes, then reset the window."""
    values = {"train/batch_loss": (window[0] / window[1]).item(),
              "optim/lr": opt.param_groups[0]["lr"] or float("inf")}
    if alig_opt is not None:
        values |= {"alig/step_size": float(alig_opt.step_size or 0.0),
                   "alig/step_size_unclipped": float(alig_opt.step_size_unclipped or 0.0),
                   "alig/clipped": (window[2] / window[1]).item()}
    run_dir.log(step, values)
    window.zero_()


def _clipped(opt: AliG | None) -> bool:
    """Whether AliG's last step was capped by ``max_lr`` (False for SGD and Adam)."""
    if opt is None or opt.step_size is None or opt.step_size_unclipped is None:
        return False
    return bool(opt.step_size_unclipped > opt.step_size)
