r"""SGD-UAP, label-free variant (the layer-norm objective of UAPGD-style universal attacks).

``sgd-uap`` maximises ``mean_i ‖A_ℓ(x_i+δ)‖₂`` with one shared δ, where ``A_ℓ`` is a named layer's
output (default 'layer4'; ``layer=''`` uses the encoder's output features) and the norm runs over
every non-batch element.

Step size: the reference step of 0.8ε belongs to a normalised-gradient SGD update; with a sign step
at every iteration it would throw δ to the corners of the ε-ball at once. Both presets therefore take
sign steps of ε/10 (cpu) or ε/25 (paper, with more iterations).

The label-based variant (clipped cross-entropy on a surrogate classifier) is not implemented: it
needs a classification head on the surrogate, and these attacks see the encoder alone.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .universal import UniversalAttack


def feature_norm(a: torch.Tensor) -> torch.Tensor:
    """``mean_i ‖a_i‖₂`` with the L2 norm over every non-batch element of sample i."""
    return a.float().flatten(1).norm(dim=1).mean()


_EPS = 10 / 255


@register_attack("sgd-uap")
class SGDUAP(UniversalAttack):
    """Maximise ``feature_norm(A_layer(x+δ))``."""

    presets = {
        "paper": {
            "eps": _EPS,
            "step": _EPS / 25,
            "batch_size": 32,
            "iterations": 2000,
            "layer": "layer4",
            "init": "uniform",
            "seed": 0,
        },
        "cpu": {
            "eps": _EPS,
            "step": _EPS / 10,
            "batch_size": 64,
            "iterations": 300,
            "layer": "layer4",
            "init": "uniform",
            "seed": 0,
        },
    }

    def objective(self, x_adv, x):
        return feature_norm(self.layer_output(x_adv))
