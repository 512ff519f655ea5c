"""The control every DAE is compared with: one fixed uniform-noise δ ~ U(−ε, ε) per pixel."""

from __future__ import annotations

import torch

from ..utils import generator
from .base import register_attack
from .perturbation import Perturbation
from .universal import UniversalAttack


@register_attack("uniform-noise")
class UniformNoise(UniversalAttack):
    parallel_mode = "replicated"  # one seeded draw: nothing to share out
    presets = {"paper": {"eps": 10 / 255, "seed": 0}, "cpu": {"eps": 10 / 255, "seed": 0}}

    def fit(self, data, device="cpu", surrogate: str = "", log=None, parallel=None) -> Perturbation:
        gen = generator(self.seed, f"attack:{self.name}")
        c, h, w = data.images.shape[1:]
        delta = (torch.rand((1, c, h, w), generator=gen) * 2 - 1) * self.eps
        self.seconds, self.history = 0.0, []
        return self.perturbation(delta, surrogate)
