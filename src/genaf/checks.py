"""Self-checks that keep an evaluation honest (recorded in ``metrics.json`` under ``checks``).

Each check returns ``{"passed": bool, "detail": str, ...}``. A failed check does not stop
the run: the CLI prints a loud warning and reports flag it. The checks:

- ``logits``: the model returns finite (N, classes) logits — not probabilities — and is
  deterministic in eval mode (two passes are bit-identical);
- ``zero_perturbation``: applying an internal all-zero perturbation gives exactly the clean
  predictions (the user-facing ε stays in (0, 1]);
- ``pgd_loss_rises``: the white-box PGD loss is higher after its steps than at its start
  (a flat loss means the gradients are masked or zero);
- ``eps_monotonic``: white-box robust accuracy over sampled ε (the same attack seed) does
  not rise with ε by more than 1 point;
- ``whitebox_vs_transfer``: white-box robust accuracy at a universal perturbation's ε is not
  above that perturbation's (transfer) robust accuracy by more than noise — a white-box
  attacker knows strictly more, so the opposite signals gradient masking.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attacks.perturbation import Perturbation
from .attacks.whitebox import pgd
from .utils import generator

EPS_TOLERANCE = 0.01  # robust accuracy may rise by at most 1 point with ε
EPS_FRACTIONS = (0.25, 0.5, 1.0, 2.0)


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def check_logits(model: nn.Module, x: torch.Tensor, n_classes: int | None = None) -> dict:
    with torch.no_grad():
        a, b = model(x), model(x)
    problems = []
    if a.dim() != 2 or not a.is_floating_point():
        problems.append(f"output is {a.dtype} {tuple(a.shape)}, not float (N, classes)")
    else:
        if n_classes is not None and a.shape[1] != n_classes:
            problems.append(f"output has {a.shape[1]} columns for {n_classes} classes")
        if not bool(torch.isfinite(a).all()):
            problems.append("output has NaN or inf values")
        elif bool((a >= 0).all() and (a <= 1).all()) and torch.allclose(a.sum(1), torch.ones(len(a)).to(a), atol=1e-4):
            problems.append("output rows are probabilities (softmax applied), not logits")
    if not torch.equal(a, b):
        problems.append(f"two eval passes differ (max |diff| {float((a - b).abs().max()):.3g}): not deterministic")
    return {"passed": not problems, "detail": "; ".join(problems) or "finite, deterministic logits"}


def check_zero_perturbation(model: nn.Module, x: torch.Tensor, clean_pred: torch.Tensor) -> dict:
    zero = Perturbation(delta=torch.zeros((1, *x.shape[1:])), eps=0.0, attack="zero")
    with torch.no_grad():
        pred = model(zero.apply(x)).argmax(1)
    changed = int((pred != clean_pred.to(pred.device)).sum())
    return {
        "passed": changed == 0,
        "changed": changed,
        "detail": "zero perturbation keeps every clean prediction"
        if changed == 0
        else f"a zero perturbation changed {changed} of {len(x)} predictions",
    }


def _wb_pgd(model, x, y, wb: dict, eps: float, seed: int, trace=None) -> torch.Tensor:
    step = float(wb["step"]) * eps / float(wb["eps"])  # the same relative step at every ε
    return pgd(
        model,
        x,
        y,
        eps,
        step,
        int(wb["steps"]),
        random_start=True,
        gen=generator(seed, "checks:pgd"),
        trace=trace,
    )


def check_pgd_loss_rises(model: nn.Module, x: torch.Tensor, y: torch.Tensor, wb: dict, seed: int = 0) -> dict:
    trace: list[float] = []
    _wb_pgd(model, x, y, wb, float(wb["eps"]), seed, trace)
    first, last = trace[0], trace[-1]
    rose = last > first + 1e-6 * max(1.0, abs(first))
    return {
        "passed": bool(rose),
        "loss_start": first,
        "loss_end": last,
        "detail": f"PGD loss {first:.4g} -> {last:.4g}"
        + ("" if rose else ": it did not rise (masked or zero input gradients?)"),
    }


def whitebox_curve(model, x, y, wb: dict, eps_list, seed: int = 0) -> dict[float, float]:
    """White-box PGD robust accuracy at each ε, with the same attack seed for every ε."""
    return {float(e): _acc(model, _wb_pgd(model, x, y, wb, float(e), seed), y) for e in eps_list}


def check_eps_monotonic(curve: dict[float, float], tolerance: float = EPS_TOLERANCE) -> dict:
    eps = sorted(curve)
    rises = [(a, b, curve[b] - curve[a]) for a, b in zip(eps, eps[1:]) if curve[b] > curve[a] + tolerance]
    detail = ", ".join(f"{255 * e:.1f}/255: {100 * curve[e]:.1f}%" for e in eps)
    if rises:
        a, b, d = max(rises, key=lambda r: r[2])
        detail = f"robust accuracy rose by {100 * d:.1f} points from ε={a:.4f} to ε={b:.4f} ({detail})"
    return {"passed": not rises, "curve": {f"{e:.6f}": curve[e] for e in eps}, "detail": detail}


def noise_margin(p: float, n: int) -> float:
    """1 point plus two binomial standard errors of an accuracy ``p`` measured on ``n`` images."""
    return 0.01 + 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def check_whitebox_vs_transfer(wb_acc: dict[float, float], transfer: dict[str, tuple[float, float]], n: int) -> dict:
    """``transfer``: name -> (ε, robust accuracy on the same images); ``wb_acc``: ε -> white-box RA."""
    rows, bad = {}, []
    for name, (eps, ra) in transfer.items():
        wra = wb_acc[float(eps)]
        margin = noise_margin(ra, n)
        rows[name] = {"eps": eps, "transfer_ra": ra, "whitebox_ra": wra, "margin": margin}
        if wra > ra + margin:
            bad.append(f"{name}: white-box {100 * wra:.1f}% > transfer {100 * ra:.1f}% at ε={eps:.4f}")
    return {
        "passed": not bad,
        "pairs": rows,
        "detail": "; ".join(bad) + " (gradient masking?)"
        if bad
        else f"white-box ≤ transfer robust accuracy for {len(rows)} perturbation(s)",
    }


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbations: dict[str, Perturbation] | None = None,
    whitebox: dict | None = None,
    n_classes: int | None = None,
    seed: int = 0,
) -> dict:
    """Every check on one batch of test images ``x`` (labels ``y``); the model is in eval mode."""
    out = {"n_images": int(len(x)), "logits": check_logits(model, x, n_classes)}
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    out["zero_perturbation"] = check_zero_perturbation(model, x, clean_pred)
    if whitebox:
        out["pgd_loss_rises"] = check_pgd_loss_rises(model, x, y, whitebox, seed)
        base = float(whitebox["eps"])
        eps_list = sorted({min(1.0, f * base) for f in EPS_FRACTIONS})
        additive = {
            n: p for n, p in (perturbations or {}).items() if p.kind == "additive" and 0 < p.eps <= 1 and p.linf() > 0
        }
        eps_list = sorted(set(eps_list) | {float(p.eps) for p in additive.values()})
        curve = whitebox_curve(model, x, y, whitebox, eps_list, seed)
        out["eps_monotonic"] = check_eps_monotonic({e: curve[e] for e in eps_list if e <= min(1.0, 2 * base)})
        if additive:
            transfer = {n: (float(p.eps), _acc(model, p.apply(x), y)) for n, p in additive.items()}
            out["whitebox_vs_transfer"] = check_whitebox_vs_transfer(curve, transfer, len(x))
    out["failed"] = [k for k, v in out.items() if isinstance(v, dict) and v.get("passed") is False]
    return out
