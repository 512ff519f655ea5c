r"""Variants of L4A (Ban & Dong, "Pre-trained Adversarial Perturbations", NeurIPS 2022).

``l4a-fuse`` lifts the activations of two layers at once::

    mean(A_ℓ1(x+δ)²) + lam · mean(A_ℓ2(x+δ)²)          (default ℓ1 'relu', ℓ2 'layer1', lam 1)

``l4a-ugs`` (uniform Gaussian sampling) applies L4A to synthetic Gaussian images as well as to the
surrogate batch::

    mean(A_ℓ(g+δ)²) + lam · mean(A_ℓ(x+δ)²)

where each Gaussian image ``g`` has, per channel c, pixels drawn from N(μ_c, σ_c²) with
μ_c ~ U[0.4, 0.6] and σ_c ~ U[0.05, 0.1], clamped to [0, 1]. A fresh Gaussian batch (as large as the
real batch) is drawn every ``resample_every`` (20) iterations from a generator seeded by
``(seed, "attack:l4a-ugs:ugs")``, so a fixed seed gives the same δ. The Gaussian images go through
the same forward pass as the real ones (they are appended to each surrogate batch), so ``g+δ`` is
clamped to [0, 1] exactly like ``x+δ``. :meth:`L4AUGS.score` uses one fixed Gaussian draw (seeded by
``"attack:l4a-ugs:ugs-eval"``) so that scores of different δ are comparable.

Both keep every L4A hyper-parameter; a preset never changes ε.
"""

from __future__ import annotations

import torch

from ..utils import generator, share
from .base import LayerTap, register_attack
from .l4a import l4a_objective
from .universal import UniversalAttack

GAUSS_MEAN = (0.4, 0.6)
GAUSS_STD = (0.05, 0.1)


def l4a_fuse_objective(a1: torch.Tensor, a2: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``mean(a1²) + lam · mean(a2²)``, each mean over every element of that layer's activation."""
    return l4a_objective(a1) + lam * l4a_objective(a2)


def l4a_ugs_objective(a_gauss: torch.Tensor, a_real: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``mean(a_gauss²) + lam · mean(a_real²)``: L4A on Gaussian images plus ``lam`` × L4A on real ones."""
    return l4a_objective(a_gauss) + lam * l4a_objective(a_real)


def gaussian_images(n: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images with per-channel N(μ_c, σ_c²) pixels, μ_c ~ U[0.4, 0.6], σ_c ~ U[0.05, 0.1], in [0, 1]."""
    lo, hi = GAUSS_MEAN
    mu = lo + (hi - lo) * torch.rand(n, c, 1, 1, generator=gen)
    lo, hi = GAUSS_STD
    sigma = lo + (hi - lo) * torch.rand(n, c, 1, 1, generator=gen)
    return (mu + sigma * torch.randn(n, c, h, w, generator=gen)).clamp(0, 1)


_L4A_PAPER = {"eps": 0.05, "step": 2e-4, "batch_size": 16, "iterations": 5000, "init": "uniform", "seed": 0}
_L4A_CPU = {"eps": 0.05, "step": 1e-3, "batch_size": 64, "iterations": 300, "init": "uniform", "seed": 0}


@register_attack("l4a-fuse")
class L4AFuse(UniversalAttack):
    """L4A on two layers at once: ``mean(A_layer²) + lam · mean(A_layer2²)``."""

    auto_layer = True  # layer: auto (genaf.attacks.layer_select)
    extra_keys = ("layer_candidates",)

    presets = {
        # METHOD.md §5 (as l4a-base): ε 0.05, sign step 2e-4, batch 16, U(±ε) init.
        "paper": dict(_L4A_PAPER, layer="relu", layer2="layer1", lam=1.0),
        # Same ε; larger steps and batches so that it converges in seconds on a CPU. The second
        # layer is chosen by the attacker on held-out surrogate images among the stem and the
        # stage-1/2 blocks (genaf.attacks.layer_select): the reference pair (stem, layer1) barely
        # beats noise on the demo encoder (docs/ATTACKS.md has both rows).
        "cpu": dict(_L4A_CPU, layer="relu", layer2="auto", lam=1.0),
    }

    def __init__(self, encoder, preset="cpu", **cfg):
        super().__init__(encoder, preset, **cfg)
        self.layers = (cfg["layer"], cfg["layer2"])
        self.lam = float(cfg["lam"])
        auto = "auto" in self.layers
        self.tap = None if auto else LayerTap(encoder, list(dict.fromkeys(self.layers)))

    def objective(self, x_adv, x):
        out = self.tap(x_adv)
        return l4a_fuse_objective(out[self.layers[0]], out[self.layers[1]], self.lam)


class _WithGaussians:
    """An ImageSet stand-in whose batches are the real batch followed by as many Gaussian images.

    It tells ``attack`` how many rows of each batch are real (``attack._n_real``). With
    ``resample_every`` set it draws a new Gaussian batch every that many batches (and counts them in
    ``attack.ugs_batches``); without it, one draw is reused for every batch (for scoring).
    ``part = (rank, world)``: the Gaussian images are drawn for the whole batch, as one process
    draws them, and this process keeps its rows of both halves.
    """

    def __init__(self, data, attack: L4AUGS, gen: torch.Generator, resample_every: int | None) -> None:
        self.data = data
        self.images = data.images
        self.attack = attack
        self.gen = gen
        self.every = resample_every
        self.gauss: torch.Tensor | None = None
        self.count = 0

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size, part=None, **kw):
        for x, y, idx in self.data.batches(batch_size, **kw):
            stale = self.every is not None and self.count % self.every == 0
            if self.gauss is None or stale or len(self.gauss) < len(x):
                self.gauss = gaussian_images(len(x), *x.shape[1:], gen=self.gen)
            self.count += 1
            if self.every is not None:
                self.attack.ugs_batches = self.count
            gauss = self.gauss[: len(x)]
            if part is not None:
                lo, hi = share(len(x), *part)
                x, y, idx, gauss = x[lo:hi], y[lo:hi], idx[lo:hi], gauss[lo:hi]
            self.attack._n_real = len(x)
            yield torch.cat([x, gauss.to(x.device, x.dtype)]), y, idx


@register_attack("l4a-ugs")
class L4AUGS(UniversalAttack):
    """L4A on Gaussian images plus ``lam`` × L4A on the surrogate batch (see the module docstring)."""

    presets = {
        "paper": dict(_L4A_PAPER, layer="relu", lam=1.0, resample_every=20),
        "cpu": dict(_L4A_CPU, layer="relu", lam=1.0, resample_every=20),
    }

    def __init__(self, encoder, preset="cpu", **cfg):
        super().__init__(encoder, preset, **cfg)
        self.lam = float(cfg["lam"])
        self.every = int(cfg["resample_every"])
        self.tap = LayerTap(encoder, [cfg["layer"]])
        self._n_real: int | None = None
        self.ugs_batches = 0

    def objective(self, x_adv, x):
        """Rows ``[:_n_real]`` are real images, the rest Gaussian ones (see :class:`_WithGaussians`).

        Called directly on a plain batch (``_n_real`` unset) it is plain L4A on that batch times ``lam``.
        """
        act = self.tap(x_adv)[self.cfg["layer"]]
        n = len(x_adv) if self._n_real is None else self._n_real
        if n >= len(act):
            return self.lam * l4a_objective(act)
        return l4a_ugs_objective(act[n:], act[:n], self.lam)

    def fit(self, data, device="cpu", surrogate="", log=None, parallel=None):
        gen = generator(self.seed, f"attack:{self.name}:ugs")
        self.ugs_batches = 0
        try:
            return super().fit(_WithGaussians(data, self, gen, self.every), device, surrogate, log, parallel=parallel)
        finally:
            self._n_real = None

    def score(self, delta, data, device="cpu", batch_size=256):
        gen = generator(self.seed, f"attack:{self.name}:ugs-eval")
        try:
            return super().score(delta, _WithGaussians(data, self, gen, None), device, batch_size)
        finally:
            self._n_real = None
