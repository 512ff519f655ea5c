"""Linear probing (LP; METHOD.md §6): the pre-trained encoder frozen, only the head trained
on clean data.

The encoder stays in eval mode (BatchNorm statistics neither used from the batch nor
updated), its features are computed without a graph and it has no optimiser, so every
encoder tensor (parameters and buffers) is bit-identical after fitting. The head is whatever
head the run configures (the MLP of METHOD.md §3 by default, a linear head with
``head: linear``). Options follow ``sft``: ``epochs``, ``head_lr``, ``weight_decay``,
``gamma`` (Adam, ExponentialLR per epoch); the checkpoint is chosen on validation clean
accuracy. FARE's stage B uses the same stage.
"""

from __future__ import annotations

from .base import Method, ParamGroup, head_params, register_method
from .genaf import HeadWarmup

LP_DEFAULTS = {"epochs": 10, "head_lr": 5e-3, "weight_decay": 8e-4, "gamma": 0.96}


class LinearProbe(HeadWarmup):
    """Clean cross-entropy on the head only, the encoder frozen in eval mode."""

    select = "clean"

    def __init__(self, cfg: dict, epochs: int, name: str = "lp") -> None:
        super().__init__(cfg, epochs)
        self.name = name

    def param_groups(self, model):
        return [
            ParamGroup("head", head_params(model), self.cfg["head_lr"], self.cfg["weight_decay"], self.cfg["gamma"])
        ]


@register_method("lp")
class LP(Method):
    @classmethod
    def default_config(cls):
        return dict(LP_DEFAULTS)

    def stages(self):
        return [LinearProbe(self.cfg, self.cfg["epochs"])]
