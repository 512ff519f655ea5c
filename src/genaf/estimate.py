"""How long a fine-tune will take, said before it starts when that is long.

A person at a CPU who runs ``genaf finetune`` with the defaults (all of Fashion-MNIST's training
split, the method's epochs, PGD-10 in every step) is in for hours; the run says so first, with
the flags that shrink it, instead of leaving them to find out from the progress bar.

The estimate times one forward + backward pass of the model on a training batch on the run's
device (after one untimed pass) and multiplies it by the batches per epoch, each stage's epochs
and the encoder passes a training step costs: 1 for a clean step, ``K + 1`` for a step that first
runs a K-step attack (the attack's passes are input-gradient passes of about the same cost). It
is a rough figure (within a factor of about two): extra forwards (TRADES' KL, Gen-AF's
pre-trained features), validation, stage 2's scoring and the evaluation are not counted.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

# Runs estimated at more than this many seconds are announced before they start.
ANNOUNCE_SECONDS = 30 * 60


def step_passes(stage, method_cfg: dict) -> int:
    """Encoder passes of one training step of ``stage``: 1, or K + 1 when it attacks first."""
    k = int(method_cfg.get("attack_steps") or 0)
    return 1 + k if callable(getattr(stage, "attack", None)) and k > 0 else 1


def time_one_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one forward + backward pass of ``model`` on ``(x, y)`` (parameter gradients are
    computed and then dropped; the model's mode and weights are unchanged)."""
    was = model.training
    model.eval()  # no BatchNorm statistics move
    try:
        for i in range(2):  # the first pass is a warm-up (allocations, lazy initialisation)
            if i == 1:
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)


def estimate_seconds(seconds_per_pass: float, n_train: int, batch_size: int, stages, method_cfg: dict) -> dict:
    """The estimate's parts: batches per epoch, epochs and passes per stage, total seconds."""
    batches = max(1, math.floor(n_train / batch_size))  # the Trainer drops the last partial batch
    per_stage = {st.name: {"epochs": int(st.epochs), "passes": step_passes(st, method_cfg)} for st in stages}
    total = sum(v["epochs"] * v["passes"] for v in per_stage.values()) * batches * seconds_per_pass
    return {"seconds": total, "batches_per_epoch": batches, "stages": per_stage, "seconds_per_pass": seconds_per_pass}


def _human(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def announcement(est: dict, n_train: int, device: str) -> str | None:
    """The line said before a long run (None when the run is short)."""
    if est["seconds"] <= ANNOUNCE_SECONDS:
        return None
    parts = ", ".join(f"{n} {v['epochs']} epoch(s) x {v['passes']} pass(es)" for n, v in est["stages"].items())
    return (
        f"this run will take about {_human(est['seconds'])} on {device} (rough estimate from one timed "
        f"training pass: {n_train} training images, {parts}); to shrink it: --n-train N, --epochs E, "
        "--attack-steps K (1 = fast mode), or a GPU (--device cuda)"
    )


def announce_cost(model: nn.Module, data, stages, method_cfg: dict, batch_size: int, device) -> str | None:
    """Time one pass on a real training batch and return the announcement for a long run (or None)."""
    n = len(data.train)
    if n == 0:
        return None
    where = next(model.parameters()).device  # the Trainer moves the model to the run's device in fit()
    x, y, _ = next(iter(data.train.batches(min(batch_size, n), device=where)))
    est = estimate_seconds(time_one_pass(model, x, y), n, batch_size, stages, method_cfg)
    return announcement(est, n, str(where) if str(where) == str(device) else f"{where} (the run will use {device})")
