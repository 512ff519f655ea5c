r"""Fast Feature Fool (FFF, Mopuri et al., BMVC 2017): a data-free universal perturbation.

FFF never looks at images: it maximises ``Σ_ℓ log mean|A_ℓ(δ)|`` over the encoder's Conv2d
layers when the perturbation alone is the input, so that δ over-fires every layer at once.

Input convention: our encoders take [0,1] images and normalise them inside, and a bare
δ ∈ [−ε, ε] is not an image. We therefore feed δ centred on mid-grey, ``clamp(0.5 + δ, 0, 1)``,
which is the [0,1]-space counterpart of the original's "δ alone" on mean-subtracted inputs.

Optimisation follows the original: Adam (lr 0.1 on the 0–255 scale, i.e. 0.1/255 in [0,1]
units) on δ, clipped to ``[−ε, ε]`` after each step, with the saturation rule simplified to:
every ``halve_every`` iterations, if more than a ``saturation`` fraction of δ's entries sit at
``±ε``, δ is halved.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import Progress, generator
from .base import LayerTap, eval_mode, register_attack
from .perturbation import Perturbation
from .universal import UniversalAttack


def fff_objective(activations: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_ℓ log mean|A_ℓ|`` over a list of activation tensors (to maximise)."""
    if not activations:
        raise ConfigError("fff needs at least one layer activation")
    return sum(torch.log(a.float().abs().mean().clamp_min(1e-12)) for a in activations)


def fff_input(delta: torch.Tensor) -> torch.Tensor:
    """The image FFF feeds the encoder: δ centred on mid-grey, in [0,1]."""
    return (0.5 + delta).clamp(0, 1)


def _layer_list(layers: Any) -> list[str]:
    if not layers:
        return []
    if isinstance(layers, str):
        return [s.strip() for s in layers.split(",") if s.strip()]
    return [str(s) for s in layers]


def default_layers(encoder) -> list[str]:
    """FFF's layers when none are named: every Conv2d of a CNN; on a transformer (blocks found by
    type, :mod:`genaf.encoders.layout`), whose only convolution is the patch embedding, that
    convolution and every block's output."""
    from ..encoders.layout import block_names, is_transformer

    convs = [n for n in encoder.weight_layer_names() if isinstance(encoder.get_layer(n), nn.Conv2d)]
    backbone = getattr(encoder, "backbone", encoder)
    if is_transformer(backbone):
        return convs[:1] + block_names(backbone)
    return convs


@register_attack("fff")
class FFF(UniversalAttack):
    """Data-free universal δ maximising ``Σ_ℓ log mean|A_ℓ(0.5 + δ)|`` over Conv2d layers (a
    transformer: its patch embedding and blocks, :func:`default_layers`).

    Options: ``eps``, ``lr`` (Adam), ``iterations``, ``halve_every``, ``saturation`` (fraction
    of entries at ±ε above which δ is halved), ``layers`` (comma-separated backbone names; empty
    for :func:`default_layers`), ``size`` (δ's side; 0 = the data's resolution, else the encoder's
    ``input_size``), ``seed`` (uniform init in [−ε, ε]).

    Data-free, so there is no batch to share: under a team of several processes every process
    crafts the same δ (``parallel`` is accepted and unused; ``genaf.craft`` keeps rank 0's δ).
    """

    parallel_mode = "replicated"

    presets = {
        "paper": {
            "eps": 10 / 255,
            "lr": 0.1 / 255,
            "iterations": 3000,
            "halve_every": 300,
            "saturation": 0.5,
            "layers": "",
            "size": 0,
            "seed": 0,
        },
        "cpu": {
            "eps": 10 / 255,
            "lr": 0.1 / 255,
            "iterations": 200,
            "halve_every": 50,
            "saturation": 0.5,
            "layers": "",
            "size": 0,
            "seed": 0,
        },
    }

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        self.lr = float(cfg["lr"])
        self.iterations = int(cfg["iterations"])
        self.halve_every = int(cfg.get("halve_every", 0))
        self.saturation = float(cfg.get("saturation", 0.5))
        if not self.lr > 0 or self.iterations < 0:
            raise ConfigError(f"fff wants lr > 0 and iterations >= 0, got lr={self.lr}, iterations={self.iterations}")
        names = _layer_list(cfg.get("layers")) or default_layers(encoder)
        if not names:
            raise ConfigError(
                "fff found no Conv2d layer or transformer block in the encoder; name some with layers=..."
            )
        self.layers = names
        self.tap = LayerTap(encoder, names, stop_early=False)

    def delta_shape(self, data=None) -> tuple[int, int, int, int]:
        """(1, C, H, W): ``size`` if set, else the data's resolution, else the encoder's input size."""
        size = int(self.cfg.get("size") or 0)
        channels = int(getattr(self.encoder, "meta", {}).get("in_chans", 3))
        if data is not None:
            images = getattr(data, "images", data)
            channels, h, w = (int(s) for s in images.shape[-3:])
        else:
            h = w = int(getattr(self.encoder, "input_size", 32))
        if size > 0:
            h = w = size
        return 1, channels, h, w

    def objective_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """The FFF objective for δ alone (call inside eval mode)."""
        out = self.tap(fff_input(delta))
        return fff_objective([out[n] for n in self.layers])

    def fit(
        self, data=None, device: str | torch.device = "cpu", surrogate: str = "", log=None, parallel=None
    ) -> Perturbation:
        """Craft δ without data (``data`` only sets the resolution) and wrap it as a Perturbation."""
        device = torch.device(device)
        gen = generator(self.seed, f"attack:{self.name}")
        delta = self.init_delta(self.delta_shape(data), gen).to(device).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        t0, history = time.time(), []
        bar = Progress(self.iterations, f"crafting {self.name}", unit="iterations", log=log, lines=10)
        with eval_mode(self.encoder), bar:
            for it in range(1, self.iterations + 1):
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    obj = self.objective_delta(delta)
                    # gradient with respect to δ only: parameters never receive a .grad
                    (g,) = torch.autograd.grad(-obj, delta, only_inputs=True)
                delta.grad = g
                opt.step()
                with torch.no_grad():
                    delta.clamp_(-self.eps, self.eps)
                    if self.halve_every > 0 and it % self.halve_every == 0:
                        saturated = float((delta.abs() >= self.eps * (1 - 1e-6)).float().mean())
                        if saturated > self.saturation:
                            delta.mul_(0.5)
                history.append(float(obj.detach()))
                bar.update(1, f"objective {history[-1]:.4g}")
        self.seconds = time.time() - t0
        self.images_seen = 0
        self.history = history
        if log and history:
            log(f"{self.name}: objective {history[0]:.4g} -> {history[-1]:.4g} in {self.seconds:.1f}s")
        return self.perturbation(delta.detach(), surrogate)

    @torch.no_grad()
    def score(self, delta: torch.Tensor, data=None, device="cpu", batch_size: int = 256) -> float:
        """The FFF objective for a fixed δ (``data`` is ignored: FFF is data-free)."""
        with eval_mode(self.encoder):
            return float(self.objective_delta(delta.to(torch.device(device))))
