r"""PAP / L4A (Ban & Dong, NeurIPS 2022): lift the low-level activations of the encoder.

``l4a-base`` maximises ``mean(A_ℓ(x+δ)²)`` at a low layer ℓ of the encoder (the stem in the
``paper`` preset; ``layer: auto`` in the ``cpu`` preset lets the attacker pick the low layer on
held-out surrogate images, see :mod:`genaf.attacks.layer_select`) with sign steps on a universal
δ initialised from U(−ε, ε).
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
    auto_layer = True  # layer: auto (genaf.attacks.layer_select)
    extra_keys = ("layer_candidates",)

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
        # Same ε; larger steps and batches so that it converges in seconds on a CPU. The layer is
        # chosen by the attacker on held-out surrogate images among the stem and the stage-1/2
        # blocks (genaf.attacks.layer_select): the stem alone barely beats noise on the demo
        # encoder (docs/ATTACKS.md has both rows; ``layer: relu`` is the reference choice).
        "cpu": {
            "eps": 0.05,
            "step": 1e-3,
            "batch_size": 64,
            "iterations": 300,
            "layer": "auto",
            "init": "uniform",
            "seed": 0,
        },
    }

    def objective(self, x_adv, x):
        return l4a_objective(self.layer_output(x_adv))
