"""Standard full fine-tuning (SFT): clean cross-entropy, encoder and head both trained."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Method, Stage, register_method, two_track_groups


class CleanStage(Stage):
    name = "sft"
    select = "clean"

    def param_groups(self, model):
        return two_track_groups(model, self.cfg)

    def step(self, model, x, y, ctx):
        return {"loss": F.cross_entropy(model(x), y)}


@register_method("sft")
class SFT(Method):
    @classmethod
    def default_config(cls):
        # The same two optimisers as Gen-AF stage 1 (METHOD.md §3), clean loss.
        return {"epochs": 10, "encoder_lr": 1e-4, "head_lr": 5e-3, "weight_decay": 8e-4, "gamma": 0.96}

    def stages(self):
        return [CleanStage(self.cfg, self.cfg["epochs"])]
