"""FAB-T: the targeted L∞ Fast Adaptive Boundary attack (Croce & Hein, ICML 2020).

FAB looks for a minimally distorted adversarial example. At the current iterate ``x_k`` it
linearises the decision boundary between the true class ``y`` and a target class ``t``:
with ``f = z_t − z_y`` (positive once ``t`` beats ``y``) and ``g = ∇_x f(x_k)``, the boundary
is approximated by the hyperplane ``π_k = {z : g·z = g·x_k − f(x_k)}``. Both the iterate and
the original point are projected onto ``π_k ∩ [0,1]^d`` in the L∞ norm (see
:func:`project_linf_box`), giving the steps ``δ_k`` (from ``x_k``) and ``δ_orig`` (from
``x_orig``). The next iterate is the biased, extrapolated combination

    ``x_{k+1} = clip_[0,1]((1 − α)(x_k + η δ_k) + α(x_orig + η δ_orig))``,
    ``α = min(‖δ_k‖∞ / (‖δ_k‖∞ + ‖δ_orig‖∞), α_max)``,

so that the iterate is pulled towards the original point the further it still is from the
boundary compared with the original point (η > 1 overshoots the linearised boundary slightly).
When ``x_{k+1}`` is misclassified, it is recorded if it is the closest adversarial example to
``x_orig`` seen so far, and the iterate is moved back towards the original point,
``x_{k+1} ← x_orig + β(x_{k+1} − x_orig)``, to search for a still smaller perturbation.

FAB-T, as in AutoAttack, runs this for each target class ``t`` among the 2nd … (target_classes+1)-th
largest clean logits (at most C − 1 of them), each with ``restarts`` runs; every run only
attacks the points that no earlier run broke. The first run of a target starts at ``x_orig``,
later ones at a random point ``x_orig + (ε/2) u / ‖u‖∞`` with ``u`` uniform in [−1,1]^d
(clipped to [0,1]), as in the reference implementation. A point counts as broken only if the
adversarial example found lies within the ε-box; points that are not broken, and points the
model already misclassifies, are returned unchanged.

The model is switched to eval mode for the attack (each submodule's mode is restored
afterwards) and every gradient is taken with respect to the input only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import check_eps
from .base import eval_mode, input_grad

_TINY = 1e-12  # keeps denominators away from zero
_MIN_NORM = 1e-8  # floor of the step norms in α, as in the reference implementation


def project_linf_box(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimal-L∞ step onto a hyperplane inside the unit box, one row at a time.

    For each row ``p`` (assumed in [0,1]^d) of ``points`` (N, d), with normal ``w`` (N, d) and
    offset ``b`` (N,), returns the ``δ`` of smallest ``‖δ‖∞`` with ``w·(p + δ) = b`` and
    ``p + δ ∈ [0,1]^d``.

    Let ``r = b − w·p`` and flip the signs of ``w, r`` so that ``r ≥ 0``. Coordinate i may move
    by at most ``m_i`` in the direction ``sign(w_i)`` (``m_i = 1 − p_i`` if ``w_i > 0``, ``p_i``
    if ``w_i < 0``, 0 if ``w_i = 0``), so within ``‖δ‖∞ ≤ λ`` the largest reachable value of
    ``w·δ`` is ``F(λ) = Σ_i |w_i| min(λ, m_i)``, attained by ``δ_i = sign(w_i) min(λ, m_i)``.
    ``F`` is piecewise linear, concave and nondecreasing, so the answer is that δ for the
    smallest λ* with ``F(λ*) = r``. When even ``F(∞) = Σ_i |w_i| m_i < r`` the hyperplane misses
    the box, and the step goes to the box corner closest to it (``δ_i = sign(w_i) m_i``).

    λ* is found by Newton's method on ``F(λ) = r`` from λ = 0: with ``S = {i : m_i < λ}`` the
    coordinates already saturated, the next λ solves ``Σ_{i∈S} |w_i| m_i + λ Σ_{i∉S} |w_i| = r``.
    By concavity the iterates rise monotonically without passing λ*, every step that does not
    stop saturates at least one more coordinate, and once ``S`` no longer changes the linear
    piece is the right one and λ is exact: at most d + 1 steps, in practice a handful.
    """
    p, w, b = points, w.to(points.dtype), b.to(points.dtype)
    r = b - (w * p).sum(1)
    flip = torch.where(r < 0, -1.0, 1.0).to(p.dtype)
    w = w * flip[:, None]
    r = r * flip
    aw = w.abs()
    room = torch.where(w > 0, 1.0 - p, p).clamp_min(0.0)  # how far each coordinate can go along sign(w)
    room = torch.where(w == 0, torch.zeros_like(room), room)
    aw_room = aw * room
    feasible = aw_room.sum(1) >= r
    lam = torch.zeros_like(r)
    for _ in range(p.shape[1] + 1):
        sat = (room < lam[:, None]).to(p.dtype)
        fixed = torch.linalg.vecdot(aw_room, sat)
        slope = torch.linalg.vecdot(aw, 1.0 - sat)
        nxt = torch.maximum((r - fixed) / slope.clamp_min(_TINY), lam)
        done = (nxt == lam) | ~feasible
        lam = nxt
        if bool(done.all()):
            break
    lam = torch.where(feasible, lam, torch.full_like(lam, float("inf")))
    return w.sign() * torch.minimum(room, lam[:, None])


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (N,) tensor so that it broadcasts over the sample dimensions of ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _linf(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).abs().amax(dim=1)


def _boundary(model: nn.Module, xk: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
    """``f = z_t − z_y`` at ``xk`` and its input gradient (one backward through the summed differences)."""
    xk = xk.detach().requires_grad_(True)
    rows = torch.arange(len(xk), device=xk.device)
    with torch.enable_grad():
        logits = model(xk)
        f = logits[rows, t] - logits[rows, y]
        g = input_grad(f.sum(), xk)
    return f.detach(), g.detach()


def _fab_run(model, x, y, t, steps, alpha_max, eta, beta, x_start):
    """One targeted FAB run from ``x_start``. Returns ``(x_best, dist_best)``: per sample the
    misclassified iterate closest to ``x`` in L∞ and its distance (``inf`` where none was found)."""
    n = len(x)
    flat = x.flatten(1)
    x_best = x.clone()
    dist_best = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    xk = x_start
    for _ in range(steps):
        f, g = _boundary(model, xk, y, t)
        with torch.no_grad():
            w = g.flatten(1)
            b = (w * xk.flatten(1)).sum(1) - f  # π_k: g·z = g·x_k − f(x_k)
            steps_both = project_linf_box(torch.cat((xk.flatten(1), flat)), torch.cat((w, w)), torch.cat((b, b)))
            d_k, d_orig = steps_both[:n], steps_both[n:]
            a_k = _linf(d_k).clamp_min(_MIN_NORM)
            a_orig = _linf(d_orig).clamp_min(_MIN_NORM)
            alpha = torch.clamp(a_k / (a_k + a_orig), max=alpha_max)[:, None]
            nxt = (1 - alpha) * (xk.flatten(1) + eta * d_k) + alpha * (flat + eta * d_orig)
            xk = nxt.clamp(0.0, 1.0).view_as(x)
            wrong = model(xk).argmax(1) != y
            if bool(wrong.any()):
                dist = _linf(xk - x)
                closer = wrong & (dist < dist_best)
                x_best[closer] = xk[closer]
                dist_best[closer] = dist[closer]
                xk[wrong] = x[wrong] + beta * (xk[wrong] - x[wrong])
    return x_best, dist_best


def _random_start(x: torch.Tensor, radius: float, gen: torch.Generator) -> torch.Tensor:
    """``x + radius · u / ‖u‖∞`` with u uniform in [−1,1]^d (drawn on the CPU), clipped to [0,1]."""
    u = torch.rand(x.shape, generator=gen, device="cpu").to(x.device, x.dtype) * 2 - 1
    peak = _linf(u).clamp_min(_TINY)
    return (x + radius * u / _per_sample(peak, u)).clamp(0.0, 1.0)


def _number(value, name: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number, got {value!r}") from exc


def _check(steps, target_classes, restarts, alpha_max, eta, beta) -> tuple:
    """Validate the options; returns them as (int, int, int, float, float, float)."""
    steps, target_classes, restarts = (
        _number(v, n, int) for v, n in ((steps, "steps"), (target_classes, "target_classes"), (restarts, "restarts"))
    )
    alpha_max, eta, beta = (_number(v, n) for v, n in ((alpha_max, "alpha_max"), (eta, "eta"), (beta, "beta")))
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if target_classes < 1:
        raise ConfigError(f"target_classes must be >= 1, got {target_classes}")
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if not (0.0 <= alpha_max <= 1.0):
        raise ConfigError(f"alpha_max must lie in [0, 1], got {alpha_max}")
    if not (eta > 0.0):
        raise ConfigError(f"eta must be > 0 (1.05 is the standard overshoot), got {eta}")
    if not (0.0 < beta <= 1.0):
        raise ConfigError(f"beta must lie in (0, 1], got {beta}")
    return steps, target_classes, restarts, alpha_max, eta, beta


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


def fab_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
) -> torch.Tensor:
    """FAB-T (targeted L∞ FAB, AutoAttack's version); returns x_adv with ``‖x_adv − x‖∞ ≤ eps`` in [0,1].

    Args:
        eps: the L∞ budget in [0,1] pixel units; a point is broken only by an adversarial
            example within it.
        steps: FAB iterations per run (AutoAttack: 100).
        target_classes: targets per point, the 2nd … (target_classes+1)-th largest clean
            logit, capped at C − 1 (AutoAttack: 9).
        restarts: runs per target; all but the first start at a random point at L∞ distance
            ε/2 (AutoAttack: 1).
        alpha_max, eta, beta: the largest bias towards the original point, the extrapolation
            factor and the backward-step factor (AutoAttack: 0.1, 1.05, 0.9).
        seed: seeds the random starts; the same seed gives the same output.

    The computation runs on the model's device; the result is returned on ``x``'s device.
    Points that are misclassified on clean input or not broken within ``eps`` come back
    unchanged; a broken point gets the closest adversarial example of the run that broke it.
    """
    eps = check_eps(eps)
    steps, target_classes, restarts, alpha_max, eta, beta = _check(
        steps, target_classes, restarts, alpha_max, eta, beta
    )
    if x.dim() < 2 or y.dim() != 1 or len(y) != len(x):
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ConfigError(f"fab_t needs x of shape (N, ...) and labels y of shape (N,), got {shapes}")
    home = x.device
    dev = _model_device(model, home)
    x = x.detach().to(dev)
    y = y.detach().to(dev).long()
    if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ConfigError("fab_t needs inputs in [0,1]")
    out = x.clone()
    if len(x) == 0:
        return out.to(home)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ConfigError(f"fab_t needs logits of shape (N, C) with C >= 2, got {tuple(logits.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise ConfigError(f"labels must lie in [0, {logits.shape[1] - 1}]")
        order = logits.argsort(dim=1, descending=True)
        robust = logits.argmax(1) == y  # correctly classified and not yet broken within eps
        for rank in range(1, min(target_classes, logits.shape[1] - 1) + 1):
            for restart in range(restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return out.detach().to(home)
                xs = x[idx]
                start = xs if restart == 0 else _random_start(xs, eps / 2, gen)
                xr, dist = _fab_run(model, xs, y[idx], order[idx, rank], steps, alpha_max, eta, beta, start)
                hit = dist <= eps
                out[idx[hit]] = xr[hit]
                robust[idx[hit]] = False
    return out.detach().to(home)
