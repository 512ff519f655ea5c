r"""Dispersion reduction (Lu et al., "Enhancing Cross-Task Black-Box Transferability of Adversarial
Examples with Dispersion Reduction", CVPR 2020) as a universal attack on the encoder alone.

``std`` *minimises* the dispersion of a mid-level feature map, ``std(A_ℓ(x+δ))`` (default ℓ
'layer2'), with one shared δ: flattening the features removes the contrast that every downstream
head relies on. The universal loop maximises, so :meth:`StdAttack.objective` returns ``−dispersion``.

The paper attacks one image at a time (ε 16/255, step 4/255, 100 iterations); the universal presets
keep the ε 0.05 of METHOD.md §5 and take sign steps of ε/25 (paper: many small steps) or ε/20 (cpu).
"""

from __future__ import annotations

import torch

from .base import register_attack
from .universal import UniversalAttack


def dispersion(a: torch.Tensor) -> torch.Tensor:
    """Per-sample standard deviation over *all* non-batch elements, averaged over the batch.

    The standard deviation is the population one (divides by the element count, not count − 1):
    for a sample with elements ``v_1..v_m`` it is ``sqrt(mean((v − mean(v))²))``.
    """
    return a.float().flatten(1).std(dim=1, correction=0).mean()


@register_attack("std")
class StdAttack(UniversalAttack):
    """Minimise ``dispersion(A_layer(x+δ))`` (returned negated, for the maximising loop)."""

    auto_layer = True  # layer: auto (genaf.attacks.layer_select)
    extra_keys = ("layer_candidates",)

    presets = {
        "paper": {
            "eps": 0.05,
            "step": 2e-3,
            "batch_size": 32,
            "iterations": 2000,
            "layer": "layer2",
            "init": "uniform",
            "seed": 0,
        },
        "cpu": {
            "eps": 0.05,
            "step": 2.5e-3,
            "batch_size": 64,
            "iterations": 300,
            "layer": "layer2",
            "init": "uniform",
            "seed": 0,
        },
    }

    def objective(self, x_adv, x):
        return -dispersion(self.layer_output(x_adv))
