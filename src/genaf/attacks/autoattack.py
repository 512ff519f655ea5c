"""AutoAttack (Croce & Hein, ICML 2020): APGD-CE and APGD-T, and the ensemble of the standard version
(APGD-CE, APGD-T, FAB-T from :mod:`genaf.attacks.fab`, Square from :mod:`genaf.attacks.square`).

Everything works on L∞ balls in [0,1] pixel space. The model is switched to eval mode for
the attack (each submodule's mode is restored afterwards) and every gradient is taken with
respect to the input only, so no parameter ever receives one.

APGD (Algorithm 1 of the paper) is sign-gradient ascent with

* a step size η that starts at 2ε and is halved, per sample, only at the checkpoints
  ``w_j = ⌈p_j · N⌉`` with ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``;
* a momentum step ``x ← P(x + α(z − x) + (1 − α)(x − x_prev))`` with α = 0.75, where
  ``z = P(x + η sign ∇L(x))`` (the very first step is a plain projected step);
* at a checkpoint, η is halved and the iterate moved back to the best point seen so far when
  either fewer than ρ = 0.75 of the steps since the previous checkpoint raised the loss, or
  neither η nor the best loss changed since the previous checkpoint.

Each sample keeps an iterate that the model misclassifies when one was met, otherwise its
highest-loss iterate. Restarts (and, for APGD-T, the further target classes) are run only on
the samples that are still classified correctly, as in the reference implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, did_you_mean
from ..utils import Progress, check_eps
from .base import eval_mode, input_grad

LOSSES = ("ce", "dlr", "dlr-targeted")

ALPHA = 0.75  # momentum weight of the fresh step
RHO = 0.75  # fraction of loss-raising steps below which the step size is halved
_TINY = 1e-12  # keeps the DLR denominators away from zero


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample untargeted Difference-of-Logits-Ratio loss.

    ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)`` with ``z_π1 ≥ z_π2 ≥ …`` the sorted logits; it
    is invariant to shifting and to positive rescaling of the logits. Needs ≥ 3 classes.
    """
    _need_classes(logits, 3, "dlr")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -(z_y - others) / (top[:, 0] - top[:, 2] + _TINY)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample targeted DLR loss ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2)``.

    Maximising it pushes the target logit ``z_t`` above the true one ``z_y``. Needs ≥ 4 classes.
    """
    _need_classes(logits, 4, "dlr-targeted")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY)


def _need_classes(logits: torch.Tensor, k: int, name: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < k:
        raise ConfigError(f"the {name} loss needs logits of shape (N, C) with C >= {k}, got {tuple(logits.shape)}")


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ⌈p_j · steps⌉`` (j ≥ 1, below ``steps``) where APGD may halve its step.

    The fractions ``p_j`` are kept in exact hundredths so that e.g. 0.22 · 100 is 22, not 23.
    """
    out: list[int] = []
    prev, cur = 0, 22  # p_0, p_1 in hundredths
    while True:
        w = -(-cur * steps // 100)  # integer ceiling
        if w >= steps:
            return out
        if w > 0 and (not out or w > out[-1]):
            out.append(w)
        prev, cur = cur, cur + max(cur - prev - 3, 6)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (N,) tensor so that it broadcasts over the sample dimensions of ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _random_start(x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """A random point of the ε-box whose largest coordinate offset is exactly ε (then clipped to [0,1])."""
    u = torch.rand(x.shape, generator=gen, device="cpu").to(x.device, x.dtype) * 2 - 1
    peak = u.flatten(1).abs().amax(dim=1).clamp_min(_TINY)
    return (x + eps * u / _per_sample(peak, u)).clamp(0.0, 1.0)


def _apgd_run(model, x, y, eps, steps, loss_of, gen):
    """One APGD run from a random start.

    Returns ``(x_out, fooled, best_loss)``: per sample, the last misclassified iterate when
    there was one, else the highest-loss iterate; whether some iterate was misclassified; and
    the highest loss reached.
    """
    n = len(x)

    def evaluate(xa):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xa)
            losses = loss_of(logits)
            g = input_grad(losses.sum(), xa)
        return losses.detach(), g.detach(), logits.detach().argmax(1) != y

    x_cur = _random_start(x, eps, gen)
    loss_cur, grad, wrong = evaluate(x_cur)
    x_best, loss_best, grad_best = x_cur.clone(), loss_cur.clone(), grad.clone()
    fooled = wrong.clone()
    x_fooled = x_cur.clone()

    step = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_prev = x_cur
    lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)  # the ε-box ∩ [0,1]
    marks = set(checkpoints(steps))
    last_mark = 0
    n_raised = torch.zeros(n, device=x.device)  # steps since the last checkpoint that raised the loss
    step_at_mark = step.clone()
    best_at_mark = loss_best.clone()

    for k in range(steps):
        with torch.no_grad():
            z = torch.clamp(torch.addcmul(x_cur, _per_sample(step, x), grad.sign()), lo, hi)
            if k == 0:
                x_new = z
            else:
                # x + α(z − x) + (1 − α)(x − x_prev), projected again
                x_new = torch.clamp(
                    z.mul_(ALPHA).add_(x_cur, alpha=2 - 2 * ALPHA).sub_(x_prev, alpha=1 - ALPHA), lo, hi
                )
        x_prev = x_cur
        loss_new, grad_new, wrong = evaluate(x_new)
        n_raised += (loss_new > loss_cur).float()
        x_cur, loss_cur, grad = x_new, loss_new, grad_new

        x_fooled[wrong] = x_cur[wrong]
        fooled |= wrong
        better = loss_cur > loss_best
        x_best[better] = x_cur[better]
        loss_best[better] = loss_cur[better]
        grad_best[better] = grad[better]

        i = k + 1  # index of the iterate just computed
        if i in marks:
            few_raised = n_raised < RHO * (i - last_mark)
            stalled = (step == step_at_mark) & (loss_best == best_at_mark)
            halve = few_raised | stalled
            step_at_mark = step.clone()  # η^(w_{j-1}) for the next check is η before this one's halving
            best_at_mark = loss_best.clone()
            step[halve] /= 2
            x_cur[halve] = x_best[halve]
            grad[halve] = grad_best[halve]
            loss_cur[halve] = loss_best[halve]
            n_raised.zero_()
            last_mark = i

    x_out = torch.where(_per_sample(fooled, x), x_fooled, x_best)
    return x_out.detach(), fooled, loss_best


def _loss_fn(loss: str, y: torch.Tensor, target: torch.Tensor | None):
    """The per-sample loss (logits -> (N,)) that APGD maximises."""
    if loss == "ce":
        return lambda logits: F.cross_entropy(logits, y, reduction="none")
    if loss == "dlr":
        return lambda logits: dlr_loss(logits, y)
    return lambda logits: dlr_targeted_loss(logits, y, target)


def _check(loss: str, steps: int, restarts: int, target_classes: int) -> None:
    if loss not in LOSSES:
        raise ConfigError(f"unknown APGD loss '{loss}'{did_you_mean(loss, LOSSES)}; choose one of: {', '.join(LOSSES)}")
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if int(restarts) < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if int(target_classes) < 1:
        raise ConfigError(f"target_classes must be >= 1, got {target_classes}")


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    loss: str = "ce",
    restarts: int = 1,
    target_classes: int = 9,
    seed: int = 0,
) -> torch.Tensor:
    """APGD-L∞; returns x_adv with ``‖x_adv − x‖∞ ≤ eps`` in [0,1].

    Args:
        loss: ``"ce"`` (APGD-CE), ``"dlr"`` (untargeted DLR) or ``"dlr-targeted"`` (APGD-T:
            one run per target class, the 2nd … (target_classes+1)-th largest clean logit,
            capped at C − 1 classes).
        steps: iterations (gradient steps) per run; the paper's standard setting is 100.
        restarts: random restarts per run (per target class for APGD-T).
        seed: seeds the random starts; the same seed gives the same output.

    The first run attacks every sample; later runs (restarts, further target classes) only
    those the model still classifies correctly. Each sample keeps a misclassified iterate when
    one was found, else its highest-loss iterate.
    """
    eps = check_eps(eps)
    _check(loss, steps, restarts, target_classes)
    steps, restarts, target_classes = int(steps), int(restarts), int(target_classes)
    x = x.detach()
    y = y.detach().to(x.device).long()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = x.clone()
    with eval_mode(model):
        if loss == "dlr-targeted":
            with torch.no_grad():
                logits = model(x)
            _need_classes(logits, 4, "dlr-targeted")
            order = logits.argsort(dim=1, descending=True)
            ranks = [r for r in range(1, min(target_classes, logits.shape[1] - 1) + 1) for _ in range(restarts)]
        else:
            order = None
            ranks = [0] * restarts
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        best = torch.full((len(x),), -math.inf, device=x.device)
        for j, rank in enumerate(ranks):
            idx = torch.arange(len(x), device=x.device) if j == 0 else (~fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            loss_of = _loss_fn(loss, y[idx], None if order is None else order[idx, rank])
            xr, fr, lr = _apgd_run(model, x[idx], y[idx], eps, steps, loss_of, gen)
            # a fooling iterate always wins; otherwise the higher loss (the first run fills every row)
            take = fr | (~fooled[idx] & (lr > best[idx]))
            out[idx[take]] = xr[take]
            best[idx[take]] = torch.maximum(best[idx[take]], lr[take])
            fooled[idx[fr]] = True
    return out.detach()


VERSIONS = {
    # AutoAttack's standard version (Croce & Hein, ICML 2020): the four attacks in this order
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    # its two gradient attacks only: most of the standard version's strength at a fraction of the cost
    "apgd": ("apgd-ce", "apgd-t"),
}


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    seed: int = 0,
    target_classes: int = 9,
    version: str = "standard",
    n_queries: int = 5000,
    log: dict | None = None,
    progress_log=None,
) -> torch.Tensor:
    """AutoAttack on an L∞ ball: the attacks of ``version`` run in turn, each on the points that
    every earlier one left correctly classified; per point the first fooling example is kept (the
    per-point worst case). Returns x_adv within the ε-box and [0,1].

    ``version="standard"`` is AutoAttack's standard ensemble: APGD-CE (``steps`` iterations),
    APGD-T (``steps`` iterations per target, ``target_classes`` targets), FAB-T (``steps``
    iterations per target; a point counts only with an example inside the ε-box) and Square
    (``n_queries`` queries, p_init 0.8). ``version="apgd"`` runs the first two only.

    Points the model already misclassifies are returned unchanged; points no attack fools keep
    the clean image. ``log``, when given, receives per attack the number of points it was run on
    and the number it fooled. ``progress_log``: where a progress line goes after each attack
    off a terminal (genaf.utils.Progress).
    """
    eps = check_eps(eps)
    _check("ce", steps, 1, target_classes)
    if version not in VERSIONS:
        raise ConfigError(
            f"unknown AutoAttack version '{version}'{did_you_mean(version, VERSIONS)}; choose one of: "
            f"{', '.join(VERSIONS)}"
        )
    if int(n_queries) < 1:
        raise ConfigError(f"n_queries must be >= 1, got {n_queries}")
    from .fab import fab_t
    from .square import square

    runners = {
        "apgd-ce": lambda xs, ys: apgd(model, xs, ys, eps, steps=steps, loss="ce", restarts=1, seed=seed),
        "apgd-t": lambda xs, ys: apgd(
            model, xs, ys, eps, steps=steps, loss="dlr-targeted", target_classes=target_classes, seed=seed
        ),
        "fab-t": lambda xs, ys: fab_t(model, xs, ys, eps, steps=steps, target_classes=target_classes, seed=seed),
        "square": lambda xs, ys: square(model, xs, ys, eps, n_queries=int(n_queries), seed=seed),
    }
    x = x.detach()
    y = y.detach().to(x.device).long()
    out = x.clone()
    with eval_mode(model), torch.no_grad():
        logits = model(x)
    robust = (logits.argmax(1) == y).nonzero().squeeze(1)
    desc = f"AutoAttack ({version}) on {len(x)} images"
    bar = Progress(len(VERSIONS[version]), desc, unit="attacks", log=progress_log)
    for name in VERSIONS[version]:
        if robust.numel() == 0:
            break
        if name in ("apgd-t", "fab-t") and logits.shape[1] < (4 if name == "apgd-t" else 2):
            bar.update(1, f"{name} skipped (too few classes)")
            continue  # the targeted DLR loss needs 4 classes
        xa = runners[name](x[robust], y[robust])
        with eval_mode(model), torch.no_grad():
            hit = model(xa).argmax(1) != y[robust]
        hit &= (xa - x[robust]).abs().flatten(1).amax(1) <= eps + 1e-6
        out[robust[hit]] = xa[hit]
        if log is not None:
            log[name] = {"attacked": int(robust.numel()), "fooled": int(hit.sum())}
        bar.update(1, f"{name} fooled {int(hit.sum())} of {int(robust.numel())} points left")
        robust = robust[~hit]
    bar.close()
    return out.detach()
