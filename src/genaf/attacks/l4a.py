r"""PAP / L4A (Ban & Dong, NeurIPS 2022): lift the low-level activations of the encoder.

``l4a-base`` maximises ``mean(A_ℓ(x+δ)²)`` at a low layer ℓ of the encoder (the stem by
default) with sign steps on a universal δ initialised from U(−ε, ε).
"""

from __future__ import annotations

import torch

from .base import register_attack
from .universal import UniversalAttack


def l4a_objective(activation: torch.Tensor) -> torch.Tensor:
    """``mean(A²)`` over every element of a layer's activation."""
    return activation.float().pow(2).mean()


@register_attack("l4a-base")
class L4ABase(UniversalAttack):
    presets = {
        # METHOD.md §5: ε 0.05, sign step 2e-4, batch 16, U(±ε) init.
        "paper": {
            "eps": 0.05,
            "step": 2e-4,
            "batch_size": 16,
            "iterations": 5000,
            "layer": "relu",
            "init": "uniform",
            "seed": 0,
        },
        # Same ε; larger steps and batches so that it converges in seconds on a CPU.
        "cpu": {
            "eps": 0.05,
            "step": 1e-3,
            "batch_size": 64,
            "iterations": 300,
            "layer": "relu",
            "init": "uniform",
            "seed": 0,
        },
    }

    def objective(self, x_adv, x):
        return l4a_objective(self.layer_output(x_adv))
