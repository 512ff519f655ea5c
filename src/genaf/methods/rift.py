"""RiFT on an AT model (Zhu et al., ICCV 2023, "Improving Generalization of Adversarial
Training via Robust Critical Fine-Tuning"; METHOD.md §6).

Stages: exactly ``at``'s (head warm-up, then PGD adversarial fine-tuning with Gen-AF stage
1's settings), then the RiFT stage (``rift``):

1. score every Conv2d/Linear module with the same robust-sensitivity code as Gen-AF stage 2
   (PGD probe from the validation split, ``eta``, ``sensitivity_steps``, ``probe_size``;
   :mod:`genaf.methods.stage2_common`), i.e. RiFT's module robust criticality;
2. fine-tune the single most robust-redundant (least critical) module (``rift_k`` = 1) on
   clean data: SGD lr 1e-3, momentum 0.9, weight decay 5e-4, lr ×0.1 after 5 epochs, 10
   epochs (``rift_lr``, ``rift_momentum``, ``rift_weight_decay``, ``rift_decay_epoch``,
   ``rift_epochs``), every other parameter and every BatchNorm statistic frozen, the epoch
   chosen on validation clean accuracy;
3. interpolate ``θ = (1 − α) θ_AT + α θ_FT`` for α ∈ {0, 0.1, …, 1} and keep the α with the
   best validation clean accuracy whose validation robust accuracy is not below the AT
   model's (``evolution_tolerance`` 0; ``evolution: false`` keeps α = 1).

Fairness: the AT part is ``at`` unchanged (ε 8/255, step 2/255, K = 10, epochs, optimisers,
head warm-up, ε schedule). The RiFT stage follows RiFT's own recipe, as METHOD.md §6 says;
the sensitivity options default to Gen-AF stage 2's.
"""

from __future__ import annotations

from ..errors import ConfigError
from .at import AT
from .base import ParamGroup, register_method
from .genaf import STAGE1_DEFAULTS
from .stage2_common import SelectiveFineTuning

RIFT_DEFAULTS = {
    "rift_epochs": 10,
    "rift_lr": 1e-3,
    "rift_momentum": 0.9,
    "rift_weight_decay": 5e-4,
    "rift_decay_epoch": 5,  # lr ×0.1 after this many epochs (0: constant)
    "rift_k": 1,
    "eta": 0.1,
    "sensitivity_steps": 5,
    "probe_size": 512,
    "evolution": True,  # False keeps the fine-tuned weights (alpha = 1)
    "evolution_tolerance": 0.0,
}


class RiftStage(SelectiveFineTuning):
    """Fine-tune the ``rift_k`` least robust-critical modules with SGD, then interpolate."""

    name = "rift"
    label = "rift"
    probe_key = "rift:probe"

    def n_selected(self, n_units: int) -> int:
        return int(self.cfg["rift_k"])

    def optimizer(self, params):
        c = self.cfg
        decay = int(c["rift_decay_epoch"])
        return ParamGroup(
            "selected",
            params,
            c["rift_lr"],
            c["rift_weight_decay"],
            1.0,
            optimizer="sgd",
            momentum=c["rift_momentum"],
            milestones=[decay] if decay > 0 else [],
        )

    def evolution(self) -> float | None:
        return float(self.cfg["evolution_tolerance"]) if self.cfg["evolution"] else None


@register_method("rift")
class RiFT(AT):
    @classmethod
    def default_config(cls):
        return dict(STAGE1_DEFAULTS, **RIFT_DEFAULTS)

    def validate(self):
        super().validate()
        if self.cfg["rift_k"] < 1:
            raise ConfigError(f"rift_k must be >= 1, got {self.cfg['rift_k']}")

    def stages(self):
        return super().stages() + [RiftStage(self.cfg, self.cfg["rift_epochs"])]
