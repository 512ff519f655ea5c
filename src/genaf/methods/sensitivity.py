r"""Robust sensitivity of layers (Gen-AF stage 2; RiFT's module robust criticality).

For a layer ``i`` with weight ``W_i``:
``ρ_i = max_{‖ΔW‖_F ≤ η‖W_i‖_F} L_rob(W_i + ΔW) − L_rob(W_i)`` with only layer ``i`` perturbed,
``L_rob`` the mean cross-entropy on an adversarial probe set, the model in eval mode.
The maximum is approximated by projected, normalised gradient ascent on ``ΔW`` (projection
after every step), then the loss is evaluated on the whole probe; the score is the largest
whole-probe loss seen minus the unperturbed one.

Cost (what makes scoring every layer cheap):

- the first ascent step starts at ``ΔW = 0``, where the gradient of ``L_rob`` with respect to
  ``W_i`` is the same whether one layer or all of them are perturbable: one forward and
  backward pass over the probe gives the first step of every unit at once (and ``L_rob(W)``);
- the remaining ``steps − 1`` steps of a unit may use a leading fraction of the probe
  (``ascent_fraction``); the final evaluation always uses the whole probe;
- during a unit's steps only that unit's tensors require gradients, so no graph is built
  below the scored layer and the backward pass never runs past it.

A *unit* is a named parameter group picked by a selector (here: each Conv2d/Linear weight),
so other groupings can be scored by passing other units. The default is by module type, so it
serves every backbone: a ResNet's convolutions and the head's Linear layers; a Vision
Transformer's patch-embedding convolution and, per block, ``attn.qkv``, ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2``. Normalisation layers (BatchNorm, LayerNorm), position embeddings
and class tokens are never units: they stay frozen in stage 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import eval_mode
from ..attacks.whitebox import frozen_params
from ..utils import Progress


def weight_units(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The default selector: every Conv2d/Linear module's weight, by full module name
    (BatchNorm, LayerNorm, position embeddings and class tokens excluded). Other selectors may
    return several tensors per unit (e.g. a whole ViT block), which are then perturbed
    jointly under one Frobenius budget."""
    return {n: [m.weight] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def _mean_ce(model, xs, ys, batch_size) -> float:
    total = 0.0
    for i in range(0, len(xs), batch_size):
        total += float(F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum"))
    return total / len(xs)


def _loss_and_grads(model, xs, ys, params, batch_size) -> tuple[float, list[torch.Tensor]]:
    """Mean cross-entropy over ``xs`` and its gradient with respect to ``params`` (which are
    made to require gradients for the call; everything else is assumed frozen)."""
    total, grads = _loss_and_grad_sums(model, xs, ys, params, batch_size)
    return total / len(xs), [g / len(xs) for g in grads]


def _loss_and_grad_sums(model, xs, ys, params, batch_size) -> tuple[float, list[torch.Tensor]]:
    """The summed cross-entropy over ``xs`` and its gradient (see :func:`_loss_and_grads`)."""
    for p in params:
        p.requires_grad_(True)
    try:
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        for i in range(0, len(xs), batch_size):
            with torch.enable_grad():
                loss = F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum")
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, gi in zip(grads, gs):
                if gi is not None:
                    acc += gi
            total += float(loss.detach())
    finally:
        for p in params:
            p.requires_grad_(False)
    return total, grads


def _norm(ts) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in ts)))


def robust_sensitivity(
    model: nn.Module,
    probe_x: torch.Tensor,
    probe_y: torch.Tensor,
    units: dict[str, list[nn.Parameter]] | None = None,
    eta: float = 0.1,
    steps: int = 10,
    step_size: float = 1.0,
    batch_size: int = 512,
    seed: int = 0,
    log=None,
    ascent_fraction: float = 1.0,
    parallel=None,
) -> dict[str, float]:
    """The robust sensitivity dictionary ``{unit name: ρ}`` (see the module docstring).

    ``units`` maps a name to the parameter tensors perturbed together (default: each
    Conv2d/Linear weight). ``steps`` normalised ascent steps of ``step_size``·``η‖W‖_F`` each
    (the first one shared by all units), each followed by the projection onto the ball; with
    ``step_size`` 1 (the default) every step ends on its boundary, where the reference
    procedure's large SGD steps end too (see ``stage2_common.SENSITIVITY_STEP``). Steps after
    the first use the leading
    ``ascent_fraction`` of the probe (at least 64 images). The ascent is deterministic
    (``seed`` is accepted for compatibility). Weights, ``requires_grad`` flags and module
    modes are restored exactly.

    ``parallel`` (``ctx.parallel`` under torchrun; a ``genaf.distributed.Team``): every process
    computes the shared first step on its rows of the probe (the sums are added up across the
    processes), scores its share of the units (round robin) on the whole probe, and every process
    returns the merged dictionary, in the order of ``units``. A unit's score is computed by one
    process exactly as a single process computes it.
    """
    units = units if units is not None else weight_units(model)
    n = len(probe_x)
    m = n if ascent_fraction >= 1 else min(n, max(64, math.ceil(ascent_fraction * n)))
    sub_x, sub_y = probe_x[:m], probe_y[:m]
    scores: dict[str, float] = {}
    team = parallel
    distributed = team is not None and team.distributed
    with eval_mode(model), frozen_params(model):
        if steps >= 1:
            every = list({id(p): p for ps in units.values() for p in ps}.values())
            if distributed:
                lo, hi = team.rows(n)
                total, sums = _loss_and_grad_sums(model, probe_x[lo:hi], probe_y[lo:hi], every, batch_size)
                parts = [torch.tensor([total], dtype=torch.float64)] + [g.double().flatten() for g in sums]
                flat = team.sum_(torch.cat(parts))
                base, at, g_all = float(flat[0]) / n, 1, []
                for g in sums:
                    g_all.append((flat[at : at + g.numel()] / n).view_as(g).to(g.dtype))
                    at += g.numel()
            else:
                base, g_all = _loss_and_grads(model, probe_x, probe_y, every, batch_size)
            first = {id(p): g for p, g in zip(every, g_all)}
        else:
            base, first = _mean_ce(model, probe_x, probe_y, batch_size), {}
        mine = team.split(list(units.items())) if distributed else list(units.items())
        bar = Progress(len(mine), "stage 2: robust sensitivity", unit="layers", log=log)
        for name, params in mine:
            w0 = [p.detach().clone() for p in params]
            radius = eta * _norm(w0)
            best = base
            d = [torch.zeros_like(t) for t in w0]
            try:
                grads = [first[id(p)] for p in params] if steps >= 1 else []
                for k in range(steps):
                    if k > 0:
                        for p, t0, dt in zip(params, w0, d):
                            p.data.copy_(t0 + dt)
                        loss, grads = _loss_and_grads(model, sub_x, sub_y, params, batch_size)
                        if m == n:
                            best = max(best, loss)
                    gn = _norm(grads)
                    if gn == 0 or radius == 0:
                        break
                    d = [dt + step_size * radius * gt / gn for dt, gt in zip(d, grads)]
                    dn = _norm(d)
                    if dn > radius:
                        d = [dt * (radius / dn) for dt in d]
                if any(bool(dt.any()) for dt in d):
                    for p, t0, dt in zip(params, w0, d):
                        p.data.copy_(t0 + dt)
                    best = max(best, _mean_ce(model, probe_x, probe_y, batch_size))
            finally:
                for p, t0 in zip(params, w0):
                    p.data.copy_(t0)
            scores[name] = best - base
            bar.update(1, f"{name}: rho (CE rise under the weight perturbation) {scores[name]:.4f}")
        bar.close()
    if distributed:
        merged = team.merge(scores)
        scores = {name: float(merged[name]) for name in units}
    return scores


def select_redundant(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` units with the lowest robust sensitivity (ties broken by name)."""
    return [n for n, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]
