r"""UAP (Moosavi-Dezfooli et al., CVPR 2017): universal δ built from minimal DeepFool steps.

The encoder has no classifier, so UAP runs on a surrogate one, ``g(x) = h(f(x))`` with ``h``
from :mod:`genaf.attacks.surrogate_head` (``head``: 'kmeans' pseudo-labels, default, or 'probe'
on the surrogate labels). With ``v = 0`` at the start, each pass visits the surrogate images in a
seeded random order; for an image ``x_i`` that ``g`` still labels as it labels the clean image,
DeepFool finds a small ``Δv_i`` that pushes ``clamp(x_i + v)`` across the nearest decision boundary
(among the ``top_k`` classes scored highest there), and when it succeeds within
``deepfool_iters`` steps, ``v ← clip(v + Δv_i, −ε, ε)``. Passes stop once the fooling rate on the
visited images reaches ``target_fooling`` or after ``max_passes``.

DeepFool norm (option ``deepfool``): by default ``'linf'``, DeepFool's ℓ∞ step: the linearised
distance to class ``k`` is ``|f_k| / ‖w_k‖₁`` and the step is ``(|f_k| + 1e-4)/‖w_k‖₁ · sign(w_k)``,
where ``f_k`` is the logit difference to the current class and ``w_k`` its input gradient. This step
is already shaped like the L∞ ball it is projected onto, so the clip wastes little of it.
``'l2'`` uses the ℓ2 step ``(|f_k| + 1e-4)/‖w_k‖₂² · w_k`` and relies on the clip to
project, as the original code did. Either way the accumulated step is scaled by
``1 + overshoot`` (0.02). Our images live in [0,1] and are clamped after perturbation, so pixels
sitting at 0 or 1 that a step would push outwards are dropped from the linearisation (on
Fashion-MNIST, whose background is exactly 0, DeepFool otherwise needs 7–10 steps instead of 2–3).
The surrogate head is fitted on the first ``head_images`` surrogate images at the start of ``fit``.

``score(δ, data)`` is a smooth stand-in for the fooling rate: the mean margin
``max_{j≠ŷ_i} z_j − z_{ŷ_i}`` of ``g`` on ``clamp(x_i + δ)``, where ``ŷ_i`` is ``g``'s prediction on
the clean ``x_i`` (it is positive for a fooled image). :meth:`UAP.fooling_rate` gives the fooling rate
itself, and ``history`` holds the fooling rate after each pass.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, unknown
from ..utils import Progress, generator
from .base import eval_mode, input_grad, register_attack
from .perturbation import Perturbation
from .surrogate_head import HEAD_KINDS, head_for_attack, margin_loss
from .universal import UniversalAttack

DEEPFOOL_NORMS = ("linf", "l2")


def deepfool(
    model,
    x: torch.Tensor,
    label: int,
    top_k: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 10,
    norm: str = "linf",
) -> tuple[torch.Tensor, bool, int]:
    """A minimal perturbation ``r`` that moves the single image ``x`` (1, C, H, W) out of ``label``.

    ``model`` maps [0,1] images to logits. The candidate classes are the ``top_k − 1`` highest logits
    at ``x`` other than ``label`` (so ``top_k`` classes take part, ``label`` included). Pixels at 0 or 1
    that a step would push out of [0,1] are left out of the linearisation, and the accumulated
    perturbation keeps ``x + r`` inside [0,1]. Returns ``(r, fooled, iterations)``; ``r`` is zero when ``x`` is
    already outside ``label`` and ``fooled`` tells whether ``clamp(x + r, 0, 1)`` left ``label``.
    Only input gradients are taken.
    """
    if norm not in DEEPFOOL_NORMS:
        raise unknown("DeepFool norm", norm, DEEPFOOL_NORMS)
    x = x.detach()
    r_tot = torch.zeros_like(x)
    classes = None
    for it in range(max_iter + 1):
        point = (x + (1 + overshoot) * r_tot).clamp(0, 1)
        if classes is None:
            with torch.no_grad():
                first = model(point)[0]
            if int(first.argmax()) != label:
                return r_tot, True, it
            order = [c for c in first.argsort(descending=True).tolist() if c != label]
            classes = torch.tensor([label] + order[: max(top_k - 1, 1)], device=x.device)
        xr = point.expand(len(classes), *x.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xr)
            picked = logits.gather(1, classes.view(-1, 1)).squeeze(1)
            if it > 0 and int(logits[0].argmax()) != label:
                return (1 + overshoot) * r_tot, True, it
            if it == max_iter:
                break
            grads = input_grad(picked.sum(), xr)
        f = (picked[1:] - picked[0]).detach()
        w = grads[1:] - grads[0]
        # a pixel at 0 cannot go down and one at 1 cannot go up: those directions do not count
        w = torch.where(((point <= 0) & (w < 0)) | ((point >= 1) & (w > 0)), torch.zeros_like(w), w).flatten(1)
        if norm == "linf":
            dual = w.abs().sum(1)
        else:
            dual = w.norm(dim=1)
        dist = f.abs() / dual.clamp_min(1e-12)
        best = int(dist.argmin())
        wb = w[best].view_as(x)
        if norm == "linf":
            r = (f[best].abs() + 1e-4) / dual[best].clamp_min(1e-12) * wb.sign()
        else:
            r = (f[best].abs() + 1e-4) / dual[best].pow(2).clamp_min(1e-12) * wb
        r_tot = (x + r_tot + r).clamp(0, 1) - x
    return (1 + overshoot) * r_tot, False, max_iter


_EPS = 10 / 255


@register_attack("uap")
class UAP(UniversalAttack):
    """Universal adversarial perturbation from accumulated DeepFool steps on a surrogate classifier.

    Options: ``eps`` (ξ, pixel units), ``target_fooling``, ``max_passes``, ``images`` (first
    ``images`` surrogate images visited; 0 = all), ``overshoot``, ``deepfool_iters``, ``top_k``,
    ``deepfool`` ('linf' or 'l2'), ``head`` ('kmeans' or 'probe'), ``head_classes`` (k-means
    clusters), ``head_images`` (surrogate images the head is fitted on; 0 = all), ``batch_size``
    (for the fooling-rate passes), ``seed``.

    The DeepFool loop visits one image at a time and each step starts from the δ the previous one
    left, so it is not shared out: under a team of several processes every process runs it whole
    (``parallel`` is accepted and unused; ``genaf.craft`` keeps rank 0's δ).
    """

    parallel_mode = "replicated"

    presets = {
        "paper": {
            "eps": _EPS,
            "target_fooling": 0.8,
            "max_passes": 10,
            "images": 10000,
            "overshoot": 0.02,
            "deepfool_iters": 10,
            "top_k": 10,
            "deepfool": "linf",
            "head": "kmeans",
            "head_classes": 10,
            "head_images": 0,
            "batch_size": 256,
            "seed": 0,
        },
        # Same ε; a few dozen images and two passes take seconds on a 2-core CPU at 28×28.
        "cpu": {
            "eps": _EPS,
            "target_fooling": 0.8,
            "max_passes": 2,
            "images": 64,
            "overshoot": 0.02,
            "deepfool_iters": 10,
            "top_k": 10,
            "deepfool": "linf",
            "head": "kmeans",
            "head_classes": 10,
            "head_images": 512,
            "batch_size": 256,
            "seed": 0,
        },
    }

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        if cfg.get("deepfool", "linf") not in DEEPFOOL_NORMS:
            raise unknown("DeepFool norm", cfg.get("deepfool"), DEEPFOOL_NORMS)
        if cfg.get("head", "kmeans") not in HEAD_KINDS:
            raise unknown("surrogate head", cfg.get("head"), HEAD_KINDS)
        if not 0 < float(cfg["target_fooling"]) <= 1:
            raise ConfigError(f"uap target_fooling must be in (0, 1], got {cfg['target_fooling']}")
        if int(cfg["max_passes"]) < 1 or int(cfg["deepfool_iters"]) < 1 or int(cfg["top_k"]) < 2:
            raise ConfigError("uap wants max_passes >= 1, deepfool_iters >= 1 and top_k >= 2")
        self.head: nn.Module | None = None

    def classifier(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate classifier's logits ``h(f(x))`` (after :meth:`fit` or :meth:`fit_head`)."""
        if self.head is None:
            raise ConfigError("uap has no surrogate head yet: call fit (or fit_head) first")
        return self.head(self.encoder(x))

    def fit_head(self, data, device="cpu") -> nn.Module:
        self.head = head_for_attack(self, data, device)
        return self.head

    @torch.no_grad()
    def predictions(self, x: torch.Tensor, delta: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        out = []
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            if delta is not None:
                xb = (xb + delta).clamp(0, 1)
            out.append(self.classifier(xb).argmax(1))
        return torch.cat(out)

    def fit(
        self, data, device: str | torch.device = "cpu", surrogate: str = "", log=None, parallel=None
    ) -> Perturbation:
        device = torch.device(device)
        gen = generator(self.seed, f"attack:{self.name}")
        n = int(self.cfg.get("images") or 0)
        visit = data.subset(n) if n > 0 else data
        x_all = visit.float_images().to(device)
        bs = int(self.cfg.get("batch_size", 256))
        target, passes = float(self.cfg["target_fooling"]), int(self.cfg["max_passes"])
        kw = {
            "top_k": int(self.cfg["top_k"]),
            "overshoot": float(self.cfg["overshoot"]),
            "max_iter": int(self.cfg["deepfool_iters"]),
            "norm": self.cfg.get("deepfool", "linf"),
        }
        v = torch.zeros((1, *x_all.shape[1:]), device=device)
        t0, history, seen = time.time(), [], 0
        with eval_mode(self.encoder):
            self.fit_head(data, device)
            clean = self.predictions(x_all, batch_size=bs)
            # at most max_passes passes; the bar counts images visited (a pass may end the run early)
            bar = Progress(passes * len(x_all), f"crafting {self.name}", unit="images", log=log, lines=10)
            for p in range(passes):
                for i in torch.randperm(len(x_all), generator=gen).tolist():
                    seen += 1
                    r, fooled, _ = deepfool(self.classifier, (x_all[i : i + 1] + v).clamp(0, 1), int(clean[i]), **kw)
                    if fooled and bool(r.abs().max() > 0):
                        v = (v + r).clamp(-self.eps, self.eps)
                    bar.update(1, f"pass {p + 1}")
                rate = float((self.predictions(x_all, v, bs) != clean).float().mean())
                history.append(rate)
                if rate >= target:
                    break
            bar.close()
        self.seconds = time.time() - t0
        self.images_seen = seen
        self.history = history
        if log:
            rate = f"surrogate fooling rate {100 * history[-1]:.1f} %"
            log(f"{self.name}: {rate} after {len(history)} pass(es) in {self.seconds:.1f}s")
        return self.perturbation(v, surrogate)

    def objective(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean margin of the surrogate classifier away from its clean prediction (see module doc)."""
        with torch.no_grad():
            y = self.classifier(x).argmax(1)
        return margin_loss(self.classifier(x_adv), y)

    @torch.no_grad()
    def fooling_rate(self, delta: torch.Tensor, data, device="cpu", batch_size: int = 256) -> float:
        """Fraction of ``data`` whose surrogate prediction changes under ``clamp(x + δ)``."""
        device = torch.device(device)
        with eval_mode(self.encoder):
            x = data.float_images().to(device)
            return float((self.predictions(x, delta.to(device), batch_size) != self.predictions(x)).float().mean())

    def score(self, delta: torch.Tensor, data, device="cpu", batch_size: int = 256) -> float:
        """The mean surrogate margin for a fixed δ (smooth stand-in for the fooling rate)."""
        if self.head is not None:
            self.head.to(torch.device(device))
        return super().score(delta, data, device, batch_size)
