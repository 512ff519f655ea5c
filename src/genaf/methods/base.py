"""What a fine-tuning method is: named stages, each owning *what* a step computes.

The Trainer owns *how* steps run (device, AMP, compile, checkpoints, resume). A stage
receives the unwrapped module for its attacks, declares its parameter groups (each becomes
one optimiser with its own settings), sets which modules train and which stay frozen, and
returns a dict of named losses (``"loss"`` is the one optimised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed import SOLO
from ..errors import ConfigError, unknown

_METHODS: dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def _import_all() -> None:
    """Import every module of the package, so each registers its methods."""
    import importlib
    import pkgutil

    from .. import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def create_method(name: str, **cfg: Any) -> Method:
    """Build a registered method; unknown options are an error listing the valid ones."""
    _import_all()
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    cls = _METHODS[name]
    defaults = cls.default_config()
    bad = [k for k in cfg if k not in defaults]
    if bad:
        from ..errors import did_you_mean

        hints = "".join(did_you_mean(b, defaults) for b in bad)
        raise ConfigError(f"method {name} has no option(s) {bad}{hints}; its options: {', '.join(sorted(defaults))}")
    merged = dict(defaults)
    merged.update({k: _coerce(name, k, v, defaults[k]) for k, v in cfg.items() if v is not None})
    negative = [k for k, v in merged.items() if k.endswith("epochs") and isinstance(v, int) and v < 0]
    if negative:
        raise ConfigError(f"method {name}: {', '.join(f'{k}={merged[k]}' for k in negative)}; epochs must be >= 0")
    import math

    nonfinite = [k for k, v in merged.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        raise ConfigError(f"method {name}: {', '.join(f'{k}={merged[k]}' for k in nonfinite)}; options must be finite")
    bad_lr = [k for k, v in merged.items() if (k == "lr" or k.endswith("_lr")) and isinstance(v, float) and v <= 0]
    if bad_lr:
        raise ConfigError(
            f"method {name}: {', '.join(f'{k}={merged[k]}' for k in bad_lr)}; learning rates must be positive"
        )
    return cls(merged)


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """Give an option the type of its default (YAML and --set may hand over '1e5' or 3 for 3.0)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"method {method}: option {key} must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        from ..utils import parse_fraction

        try:
            num = parse_fraction(value) if isinstance(value, str) else float(value)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"method {method}: option {key} must be a number, got {value!r}") from exc
        if isinstance(default, int) and not isinstance(default, bool):
            if num != int(num):
                raise ConfigError(f"method {method}: option {key} must be a whole number, got {value!r}")
            return int(num)
        return num
    return value


@dataclass
class ParamGroup:
    """One optimiser: its parameters and settings (Adam by default, ExponentialLR per epoch)."""

    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    gamma: float = 1.0  # ExponentialLR factor per epoch
    optimizer: str = "adam"
    momentum: float = 0.9
    milestones: list[int] = field(default_factory=list)  # MultiStepLR (×0.1) when set


@dataclass
class Context:
    """What a stage may use besides the model: data, device, seed, a frozen copy of the
    pre-trained encoder, a logger, the run directory (for artefacts), and ``attack_fold``: the
    model to attack in place of the trained one (``genaf.fold.AttackFold``: a copy with its
    BatchNorms folded into the convolutions, for eval-mode attacks only; None: the model),
    and ``parallel``: the processes of a torchrun run (``genaf.distributed.Team``; a team of one
    otherwise, on which every helper is the identity). A method shares work out and gathers
    results through it, and imports nothing of ``torch.distributed`` itself."""

    data: Any
    device: torch.device
    seed: int
    reference_encoder: nn.Module | None
    log: Any
    run_dir: Any = None
    artifacts: dict = field(default_factory=dict)
    attack_fold: Any = None
    parallel: Any = SOLO


def parallel_of(ctx) -> Any:
    """``ctx.parallel``, or a team of one for a context that has none."""
    return getattr(ctx, "parallel", None) or SOLO


class Stage:
    """One phase of a method (e.g. Gen-AF stage 1). Subclasses override the hooks."""

    name = "stage"
    select = "clean"  # validation criterion: "clean", "robust", "clean+robust", "last"
    needs_val_robust = False
    # The Trainer keeps the model before this stage (artefacts "stage1_state", "stage1_val")
    snapshot_start = False

    def __init__(self, cfg: dict, epochs: int) -> None:
        self.cfg = cfg
        self.epochs = int(epochs)
        self.epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch (0-based, counted within this stage)."""
        self.epoch = int(epoch)

    def setup(self, model: nn.Module, ctx: Context) -> dict:
        """Run once before the stage's first epoch; returns JSON-able artefacts (kept on resume)."""
        return {}

    def restore(self, model: nn.Module, ctx: Context, artifacts: dict) -> None:
        """Re-apply setup's effect from saved artefacts when resuming."""

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        raise NotImplementedError

    def set_modes(self, model: nn.Module) -> None:
        """Called after ``model.train()``: put frozen parts back in eval mode."""

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Context) -> dict[str, torch.Tensor]:
        """One update's losses on this process's rows ``x, y`` of the global batch. Under torchrun
        ``model`` is the Trainer's DDP view: call it, ``features`` and ``forward_head`` for every
        forward that trains; attack ``ctx.attack_fold(model)`` (see ``Stage1.attacked_model``),
        never ``model`` itself. A loss that is a mean over this process's rows is the mean over
        the global batch once DDP averages the gradients."""
        raise NotImplementedError

    def finish(self, model: nn.Module, ctx: Context, evaluate) -> dict:
        """Run once after the best checkpoint is restored; returns JSON-able artefacts."""
        return {}


class Method:
    """A fine-tuning method: a list of stages and its default configuration."""

    name = "method"

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.validate()

    @classmethod
    def default_config(cls) -> dict:
        return {}

    def validate(self) -> None:
        pass

    def stages(self) -> list[Stage]:
        raise NotImplementedError


def two_track_groups(model: nn.Module, cfg: dict) -> list[ParamGroup]:
    """The dual track of METHOD.md §3: one optimiser for the encoder, one for the head."""
    return [
        ParamGroup("encoder", encoder_params(model), cfg["encoder_lr"], cfg["weight_decay"], cfg["gamma"]),
        ParamGroup("head", head_params(model), cfg["head_lr"], cfg["weight_decay"], cfg["gamma"]),
    ]


def encoder_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.encoder.parameters()]


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.head.parameters()]
