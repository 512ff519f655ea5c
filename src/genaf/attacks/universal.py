"""The common loop of universal (image-agnostic) L∞ attacks crafted on an encoder alone."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import ImageSet
from ..utils import Progress, generator, tensor_hash
from .base import EncoderAttack, eval_mode, input_grad
from .layer_select import AUTO_KEYS, fit_auto
from .perturbation import Perturbation

PROGRESS_LINES = 10  # plain progress lines per crafting run (off a terminal)


def encoder_hash(encoder: nn.Module) -> str:
    return tensor_hash({k: v for k, v in encoder.state_dict().items()})


def layer_modules(encoder: nn.Module, cfg: dict) -> dict:
    """``{"layer_modules": {name: module}}`` for the layer options that are aliases on this encoder
    (a ViT's ``layer2`` is ``blocks.1``, :mod:`genaf.encoders.layout`), so a perturbation records
    the module it was crafted on; ``{}`` when every name is the module's own."""
    resolve = getattr(encoder, "resolve_layer", None)
    names = [cfg.get(k) for k in ("layer", "layer2")]
    names += [n.strip() for n in str(cfg.get("layers") or "").split(",")]
    found = {n: resolve(n) for n in names if resolve and isinstance(n, str) and n and n != "auto"}
    found = {n: m for n, m in found.items() if m != n}
    return {"layer_modules": found} if found else {}


class UniversalAttack(EncoderAttack):
    """Sign-gradient ascent on one shared δ (‖δ‖∞ ≤ ε) over batches of surrogate images.

    Subclasses implement ``objective(x_adv, x) -> scalar`` (to maximise). ``fit`` returns a
    :class:`Perturbation`. Hyper-parameters: ``eps`` (pixel units), ``step`` (per sign step),
    ``iterations`` (batches seen), ``batch_size``, ``init`` ('uniform' or 'zero'), ``seed``.
    """

    name = "universal"

    def objective(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_delta(self, shape, gen: torch.Generator) -> torch.Tensor:
        if self.cfg.get("init", "uniform") == "zero":
            return torch.zeros(shape)
        return (torch.rand(shape, generator=gen) * 2 - 1) * self.eps

    def fit(self, data: ImageSet, device: str | torch.device = "cpu", surrogate: str = "", log=None) -> Perturbation:
        if any(self.cfg.get(k) == "auto" for k in AUTO_KEYS):
            return fit_auto(self, data, device, surrogate, log)
        device = torch.device(device)
        gen = generator(self.seed, f"attack:{self.name}")
        c, h, w = data.images.shape[1:]
        delta = self.init_delta((1, c, h, w), gen).to(device)
        step = float(self.cfg["step"])
        iters, bs = int(self.cfg["iterations"]), int(self.cfg["batch_size"])
        t0, done, history = time.time(), 0, []
        bar = Progress(iters, f"crafting {self.name}", unit="iterations", log=log, lines=PROGRESS_LINES)
        with eval_mode(self.encoder), bar:
            while done < iters:
                for x, _, _ in data.batches(bs, shuffle=True, gen=gen, device=device, drop_last=len(data) >= bs):
                    delta.requires_grad_(True)
                    with torch.enable_grad():
                        obj = self.objective((x + delta).clamp(0, 1), x)
                    g = input_grad(obj, delta)
                    delta = (delta.detach() + step * g.sign()).clamp(-self.eps, self.eps)
                    history.append(float(obj.detach()))
                    done += 1
                    bar.update(1, f"objective {history[-1]:.4g}")
                    if done >= iters:
                        break
        self.seconds = time.time() - t0
        self.images_seen = iters * bs
        self.history = history
        if log:
            log(f"{self.name}: objective {history[0]:.4g} -> {history[-1]:.4g} in {self.seconds:.1f}s")
        return self.perturbation(delta, surrogate)

    def perturbation(self, delta: torch.Tensor, surrogate: str = "") -> Perturbation:
        """Wrap a fitted δ with everything needed to reproduce and audit it."""
        return Perturbation(
            delta=delta.detach().cpu(),
            kind="additive",
            eps=self.eps,
            attack=self.name,
            config=dict(self.cfg, preset=self.preset, **layer_modules(self.encoder, self.cfg)),
            encoder_hash=encoder_hash(self.encoder),
            encoder_source=str(getattr(self.encoder, "meta", {}).get("source", "")),
            surrogate=surrogate,
            seed=self.seed,
        )

    @torch.no_grad()
    def score(self, delta: torch.Tensor, data: ImageSet, device="cpu", batch_size: int = 256) -> float:
        """The attack's objective for a fixed δ, averaged over ``data`` (for tests and checks)."""
        device = torch.device(device)
        total, n = 0.0, 0
        with eval_mode(self.encoder):
            for x, _, _ in data.batches(batch_size, device=device):
                total += float(self.objective((x + delta.to(device)).clamp(0, 1), x)) * len(x)
                n += len(x)
        return total / max(n, 1)
