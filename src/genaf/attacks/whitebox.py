"""White-box attacks on a (defended) classifier: FGSM and PGD-L∞ in [0,1] pixel space.

The model is switched to eval mode for the attack (previous per-module modes restored) and
gradients are taken with respect to the input only. While an attack runs, the model's
parameters do not require gradients (:func:`frozen_params`; restored afterwards), so the
attack's graphs hold no weight-gradient nodes and its backward passes compute input
gradients only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_eps, draw
from .base import eval_mode, input_grad


@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on every parameter of ``model`` that has it, and turn it back
    on afterwards (exactly those parameters). Attack results are unchanged: only the input
    gradient is ever taken."""
    live = [p for p in model.parameters() if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in live:
            p.requires_grad_(True)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    random_start: bool = True,
    restarts: int = 1,
    gen: torch.Generator | None = None,
    loss_fn=None,
    trace: list[float] | None = None,
) -> torch.Tensor:
    """PGD-L∞ maximising cross-entropy; returns x_adv with ``‖x_adv − x‖∞ ≤ eps`` in [0,1].

    With several restarts, each sample keeps the first restart that fools the model (or the
    last one). ``steps=1, random_start=False, step=eps`` is FGSM. ``trace``, when given,
    receives the mean loss of the first restart at its start and after each step.
    """
    check_eps(eps)
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="sum"))
    x = x.detach()
    best = x.clone()
    with eval_mode(model), frozen_params(model):
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for r in range(max(1, restarts)):
            if random_start:
                noise = draw(torch.rand, x.shape, gen).to(x.device, x.dtype)
                xa = (x + (noise * 2 - 1) * eps).clamp(0, 1)
            else:
                xa = x.clone()
            for _ in range(steps):
                xa.requires_grad_(True)
                with torch.enable_grad():
                    loss = loss_fn(model(xa), y)
                g = input_grad(loss, xa)
                if trace is not None and r == 0:
                    trace.append(float(loss.detach()) / len(x))
                xa = xa.detach() + step * g.sign()
                xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
            if restarts <= 1 and trace is None:
                # a single restart keeps its result whatever the model predicts on it: the
                # check forward pass below would be wasted
                return xa.detach()
            with torch.no_grad():
                logits = model(xa)
                now = logits.argmax(1) != y
                if trace is not None and r == 0:
                    trace.append(float(loss_fn(logits, y)) / len(x))
            take = now | ~fooled
            best[take] = xa[take].detach()
            fooled |= now
            if bool(fooled.all()):
                break
    return best.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    return pgd(model, x, y, eps, step=eps, steps=1, random_start=False)
