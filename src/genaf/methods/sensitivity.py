r"""Robust sensitivity of layers (Gen-AF stage 2; RiFT's module robust criticality).

For a layer ``i`` with weight ``W_i``:
``ρ_i = max_{‖ΔW‖_F ≤ η‖W_i‖_F} L_rob(W_i + ΔW) − L_rob(W_i)`` with only layer ``i`` perturbed,
``L_rob`` the mean cross-entropy on an adversarial probe set, the model in eval mode.
The maximum is approximated by projected, normalised gradient ascent on ``ΔW`` (projection
after every step), keeping the largest loss seen. Gradients are taken with respect to that
one weight only, so the backward pass never runs below the scored layer.

A *unit* is a named parameter group picked by a selector (here: each Conv2d/Linear weight),
so other architectures (e.g. ViT blocks) can be scored by passing other units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import eval_mode
from ..utils import generator


def weight_units(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d/Linear module by full name (BatchNorm excluded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def _mean_ce(model, xs, ys, batch_size) -> float:
    total = 0.0
    for i in range(0, len(xs), batch_size):
        total += float(F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum"))
    return total / len(xs)


def robust_sensitivity(
    model: nn.Module,
    probe_x: torch.Tensor,
    probe_y: torch.Tensor,
    units: dict[str, nn.Module] | None = None,
    eta: float = 0.1,
    steps: int = 10,
    step_size: float = 0.5,
    batch_size: int = 512,
    seed: int = 0,
    log=None,
) -> dict[str, float]:
    """The robust sensitivity dictionary ``{unit name: ρ}`` (see the module docstring).

    ``step_size`` is the fraction of the radius ``η‖W‖_F`` moved per normalised ascent step.
    Weights are restored bit-exactly after each unit.
    """
    units = units if units is not None else weight_units(model)
    scores: dict[str, float] = {}
    with eval_mode(model):
        base = _mean_ce(model, probe_x, probe_y, batch_size)
        for name, module in units.items():
            w = module.weight
            w0 = w.detach().clone()
            radius = eta * float(w0.norm())
            g = generator(seed, f"sensitivity:{name}")
            d = torch.randn(w0.shape, generator=g).to(w0) if radius > 0 else torch.zeros_like(w0)
            d = d * (radius * 1e-3 / max(float(d.norm()), 1e-12))
            best = base
            try:
                for _ in range(steps):
                    w.data.copy_(w0 + d)
                    grad = torch.zeros_like(w0)
                    total = 0.0
                    for i in range(0, len(probe_x), batch_size):
                        with torch.enable_grad():
                            loss = F.cross_entropy(
                                model(probe_x[i : i + batch_size]), probe_y[i : i + batch_size], reduction="sum"
                            )
                            (gi,) = torch.autograd.grad(loss, w)
                        grad += gi
                        total += float(loss.detach())
                    best = max(best, total / len(probe_x))
                    gn = float(grad.norm())
                    if gn == 0 or radius == 0:
                        break
                    d = d + step_size * radius * grad / gn
                    dn = float(d.norm())
                    if dn > radius:
                        d = d * (radius / dn)
                w.data.copy_(w0 + d)
                best = max(best, _mean_ce(model, probe_x, probe_y, batch_size))
            finally:
                w.data.copy_(w0)
            scores[name] = best - base
            if log:
                log(f"  sensitivity {name:<28s} rho={scores[name]:.4f}")
    return scores


def select_redundant(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` units with the lowest robust sensitivity (ties broken by name)."""
    return [n for n, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]
