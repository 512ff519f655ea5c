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


def weight_units(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The default selector: every Conv2d/Linear module's weight, by full module name
    (BatchNorm excluded). Other selectors may return several tensors per unit (e.g. a ViT
    block), which are then perturbed jointly under one Frobenius budget."""
    return {n: [m.weight] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


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
    units: dict[str, list[nn.Parameter]] | None = None,
    eta: float = 0.1,
    steps: int = 10,
    step_size: float = 0.5,
    batch_size: int = 512,
    seed: int = 0,
    log=None,
) -> dict[str, float]:
    """The robust sensitivity dictionary ``{unit name: ρ}`` (see the module docstring).

    ``units`` maps a name to the parameter tensors perturbed together (default: each
    Conv2d/Linear weight). ``step_size`` is the fraction of the radius ``η‖W‖_F`` moved per
    normalised ascent step. Weights are restored bit-exactly after each unit.
    """
    units = units if units is not None else weight_units(model)
    scores: dict[str, float] = {}
    with eval_mode(model):
        base = _mean_ce(model, probe_x, probe_y, batch_size)
        for name, params in units.items():
            w0 = [p.detach().clone() for p in params]
            radius = eta * float(torch.sqrt(sum(t.pow(2).sum() for t in w0)))
            g = generator(seed, f"sensitivity:{name}")
            d = [torch.randn(t.shape, generator=g).to(t) for t in w0]
            dn = float(torch.sqrt(sum(t.pow(2).sum() for t in d)))
            d = [t * (radius * 1e-3 / max(dn, 1e-12)) for t in d]
            best = base
            try:
                for _ in range(steps):
                    for p, t0, dt in zip(params, w0, d):
                        p.data.copy_(t0 + dt)
                    grads = [torch.zeros_like(t) for t in w0]
                    total = 0.0
                    for i in range(0, len(probe_x), batch_size):
                        with torch.enable_grad():
                            loss = F.cross_entropy(
                                model(probe_x[i : i + batch_size]), probe_y[i : i + batch_size], reduction="sum"
                            )
                            gs = torch.autograd.grad(loss, params)
                        for acc, gi in zip(grads, gs):
                            acc += gi
                        total += float(loss.detach())
                    best = max(best, total / len(probe_x))
                    gn = float(torch.sqrt(sum(t.pow(2).sum() for t in grads)))
                    if gn == 0 or radius == 0:
                        break
                    d = [dt + step_size * radius * gt / gn for dt, gt in zip(d, grads)]
                    dn = float(torch.sqrt(sum(t.pow(2).sum() for t in d)))
                    if dn > radius:
                        d = [dt * (radius / dn) for dt in d]
                for p, t0, dt in zip(params, w0, d):
                    p.data.copy_(t0 + dt)
                best = max(best, _mean_ce(model, probe_x, probe_y, batch_size))
            finally:
                for p, t0 in zip(params, w0):
                    p.data.copy_(t0)
            scores[name] = best - base
            if log:
                log(f"  sensitivity {name:<28s} rho={scores[name]:.4f}")
    return scores


def select_redundant(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` units with the lowest robust sensitivity (ties broken by name)."""
    return [n for n, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]
