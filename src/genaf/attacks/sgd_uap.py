r"""SGD-UAP / UAPGD-style universal attacks: a label-free layer-norm objective or a clipped CE.

Option ``objective``:

* ``'layer-norm'`` (default): maximise ``mean_i ‖A_ℓ(x_i+δ)‖₂`` with one shared δ, where ``A_ℓ`` is
  a named layer's output (default 'layer4'; ``layer=''`` uses the encoder's output features) and
  the norm runs over every non-batch element.
* ``'clipped-ce'``: maximise ``mean_i min(CE(h(f(x_i+δ)), ŷ_i), β)`` (Shafahi et al.; ``beta``,
  default 12), where ``h`` is a surrogate linear head on the encoder's features
  (:mod:`genaf.attacks.surrogate_head`, option ``head``: 'kmeans' pseudo-labels with
  ``head_classes`` clusters, or a 'probe' on the surrogate labels), fitted on the first
  ``head_images`` surrogate images (0 = all) at the start of :meth:`SGDUAP.fit`. ``ŷ_i`` is the
  head's prediction on the clean ``x_i`` for both heads: with 'probe' the labels shape the head,
  while the attack pushes every image away from what the surrogate classifier says about it (the
  fooling-rate view, and the same rule serves ``score`` on any image set). The clip at β stops
  images already far across a boundary from dominating the gradient. This objective uses the
  full encoder; the ``layer`` option only matters for 'layer-norm'.

Step size: the reference step of 0.8ε belongs to a normalised-gradient SGD update; with a sign step
at every iteration it would throw δ to the corners of the ε-ball at once. Both presets therefore take
sign steps of ε/10 (cpu) or ε/25 (paper, with more iterations).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, unknown
from .base import register_attack
from .perturbation import Perturbation
from .surrogate_head import HEAD_KINDS, head_for_attack
from .universal import UniversalAttack, sharing_team

OBJECTIVES = ("layer-norm", "clipped-ce")


def feature_norm(a: torch.Tensor) -> torch.Tensor:
    """``mean_i ‖a_i‖₂`` with the L2 norm over every non-batch element of sample i."""
    return a.float().flatten(1).norm(dim=1).mean()


def clipped_ce(logits: torch.Tensor, y: torch.Tensor, beta: float = 12.0) -> torch.Tensor:
    """``mean_i min(CE(logits_i, y_i), β)``."""
    ce = F.cross_entropy(logits.float(), y.long(), reduction="none")
    return ce.clamp(max=float(beta)).mean()


_EPS = 10 / 255


@register_attack("sgd-uap")
class SGDUAP(UniversalAttack):
    """Maximise ``feature_norm(A_layer(x+δ))`` or the clipped CE of a surrogate head (``objective``)."""

    presets = {
        "paper": {
            "eps": _EPS,
            "step": _EPS / 25,
            "batch_size": 32,
            "iterations": 2000,
            "layer": "layer4",
            "init": "uniform",
            "seed": 0,
            "objective": "layer-norm",
            "beta": 12.0,
            "head": "kmeans",
            "head_classes": 10,
            "head_images": 0,
        },
        "cpu": {
            "eps": _EPS,
            "step": _EPS / 10,
            "batch_size": 64,
            "iterations": 300,
            "layer": "layer4",
            "init": "uniform",
            "seed": 0,
            "objective": "layer-norm",
            "beta": 12.0,
            "head": "kmeans",
            "head_classes": 10,
            "head_images": 512,
        },
    }

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        self.objective_name = str(cfg.get("objective") or "layer-norm")
        if self.objective_name not in OBJECTIVES:
            raise unknown("sgd-uap objective", self.objective_name, OBJECTIVES)
        if cfg.get("head", "kmeans") not in HEAD_KINDS:
            raise unknown("surrogate head", cfg.get("head"), HEAD_KINDS)
        self.beta = float(cfg.get("beta", 12.0))
        if not self.beta > 0:
            raise ConfigError(f"sgd-uap beta must be positive, got {self.beta}")
        self.head: nn.Module | None = None

    def fit_head(self, data, device="cpu") -> nn.Module:
        self.head = head_for_attack(self, data, device)
        return self.head

    def fit(
        self, data, device: str | torch.device = "cpu", surrogate: str = "", log=None, parallel=None
    ) -> Perturbation:
        if self.objective_name == "clipped-ce":
            self.fit_head(data, device)  # on every process (seeded); rank 0's head is kept by all
            team = sharing_team(parallel)
            if team is not None:
                for t in self.head.state_dict().values():
                    team.broadcast_(t)
        return super().fit(data, device=device, surrogate=surrogate, log=log, parallel=parallel)

    def objective(self, x_adv, x):
        if self.objective_name == "layer-norm":
            return feature_norm(self.layer_output(x_adv))
        if self.head is None:
            raise ConfigError("sgd-uap with objective='clipped-ce' has no surrogate head yet: call fit first")
        with torch.no_grad():
            y = self.head(self.encoder(x)).argmax(1)
        return clipped_ce(self.head(self.encoder(x_adv)), y, self.beta)

    def score(self, delta, data, device="cpu", batch_size: int = 256) -> float:
        if self.head is not None:
            self.head.to(torch.device(device))
        return super().score(delta, data, device, batch_size)
