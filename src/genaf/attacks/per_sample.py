r"""Per-sample, label-free attacks crafted on the encoder alone (no downstream head, no labels).

Each attack runs PGD-L∞ with sign steps in [0,1] pixel space on one batch: the perturbed batch
``x'`` stays in the box ``‖x' − x‖∞ ≤ ε`` intersected with ``[0,1]`` after every step, the
encoder runs in eval mode (every submodule's mode is restored afterwards) and gradients are
taken with respect to the input only, so no parameter ever receives a ``.grad``.

* ``embedding-pgd`` maximises ``mean_i ‖f(x_i+δ_i) − f(x_i)‖²`` on the encoder's output
  (``loss='l2'``) or ``−mean_i cos(f(x_i+δ_i), f(x_i))`` (``loss='cos'``).
* ``ssp`` is the per-sample self-supervised perturbation of Naseer et al. (CVPR 2020):
  maximise ``mean_i ‖A_ℓ(x_i+δ_i) − A_ℓ(x_i)‖²`` at one layer (default ``layer2``), from noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..utils import generator
from .base import EncoderAttack, eval_mode, input_grad, register_attack
from .ssp import feature_distortion

LOSSES = ("l2", "cos")


def negative_cosine(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``−mean_i cos(a_i, c_i)`` with each sample flattened to a vector (higher = further apart)."""
    return -F.cosine_similarity(adv.float().flatten(1), clean.float().flatten(1), dim=1).mean()


def embedding_objective(adv: torch.Tensor, clean: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """The ``embedding-pgd`` objective: squared L2 feature distortion or negative cosine similarity."""
    if loss == "l2":
        return feature_distortion(adv, clean)
    if loss == "cos":
        return negative_cosine(adv, clean)
    raise ConfigError(f"loss '{loss}' is not one of {LOSSES}")


class PerSampleAttack(EncoderAttack):
    """PGD-L∞ with sign steps on each image of a batch, maximising ``objective`` on the encoder.

    Options: ``eps`` (pixel units, in (0, 1]), ``step`` (per sign step), ``steps``,
    ``random_start`` (uniform start in the ε-box, drawn from a generator seeded by ``seed`` and
    the attack's name, so a fixed seed gives the same result), ``layer`` (a backbone layer name;
    empty for the encoder's output), ``seed``. Subclasses implement ``loss(adv_feat, clean_feat)``.
    """

    name = "per-sample"

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        self.step = float(cfg["step"])
        if not self.step > 0:
            raise ConfigError(f"step must be positive, got {cfg['step']!r}")
        self.steps = int(cfg["steps"])
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {cfg['steps']!r}")
        self.random_start = bool(cfg.get("random_start", True))
        self.history: list[float] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the objective compares: the tapped layer, or the encoder output."""
        return self.layer_output(x)

    def loss(self, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The batch scalar the attack maximises (clean features carry no gradient)."""
        with torch.no_grad():
            clean = self.features(x)
        return self.loss(self.features(x_adv), clean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x_adv`` for a float [0,1] batch (N, C, H, W), with ``‖x_adv − x‖∞ ≤ ε``."""
        if not torch.is_floating_point(x):
            raise ConfigError(f"{self.name} wants float images in [0,1], got {x.dtype}")
        x = x.detach()
        lo, hi = (x - self.eps).clamp(min=0), (x + self.eps).clamp(max=1)
        if self.random_start:
            gen = generator(self.seed, f"attack:{self.name}")
            noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * self.eps
            x_adv = (x + noise.to(device=x.device, dtype=x.dtype)).clamp(lo, hi)
        else:
            x_adv = x.clone()
        history = []
        with eval_mode(self.encoder):
            with torch.no_grad():
                clean = self.features(x)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    obj = self.loss(self.features(x_adv), clean)
                g = input_grad(obj, x_adv)
                x_adv = (x_adv.detach() + self.step * g.sign()).clamp(lo, hi)
                history.append(float(obj.detach()))
        self.history = history
        return x_adv.detach()


@register_attack("embedding-pgd")
class EmbeddingPGD(PerSampleAttack):
    """Push each image's embedding away from its clean embedding (``loss``: 'l2' or 'cos')."""

    presets = {
        "paper": {
            "eps": 8 / 255,
            "step": 2 / 255,
            "steps": 20,
            "random_start": True,
            "layer": "",
            "loss": "l2",
            "seed": 0,
        },
        "cpu": {
            "eps": 8 / 255,
            "step": 2 / 255,
            "steps": 10,
            "random_start": True,
            "layer": "",
            "loss": "l2",
            "seed": 0,
        },
    }

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        self.loss_name = str(cfg.get("loss", "l2"))
        if self.loss_name not in LOSSES:
            raise ConfigError(f"embedding-pgd loss '{self.loss_name}' is not one of {LOSSES}")

    def loss(self, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return embedding_objective(adv, clean, self.loss_name)


@register_attack("ssp")
class SSP(PerSampleAttack):
    """Per-sample SSP (Naseer et al., CVPR 2020): feature distortion at one layer, from noise."""

    presets = {
        "paper": {
            "eps": 16 / 255,
            "step": 0.01,
            "steps": 100,
            "random_start": True,
            "layer": "layer2",
            "seed": 0,
        },
        "cpu": {
            "eps": 16 / 255,
            "step": 0.01,
            "steps": 20,
            "random_start": True,
            "layer": "layer2",
            "seed": 0,
        },
    }

    def loss(self, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return feature_distortion(adv, clean)
