"""Self-checks that keep an evaluation honest (recorded in ``metrics.json`` under ``checks``).

Each check returns ``{"passed": bool, "detail": str, ...}``. A failed check does not stop
the run: the CLI prints a loud warning and reports flag it. The checks:

- ``logits``: the model returns finite (N, classes) logits — not probabilities — and is
  deterministic in eval mode (two passes are bit-identical);
- ``perturbation_applied``: the first evaluated perturbed batch of each entry equals an independent
  ``clamp(x + clamp(δ, −ε, ε), 0, 1)`` (or the patch pasted by its mask; for per-sample DAEs:
  the adversarial images handed over), stays in [0, 1] and within ε of the clean images, and
  differs from them (a perturbation that was never applied cannot pass);
- ``prediction_collapse``: the model does not answer (nearly) one class for every image: the
  most frequent predicted class may cover at most ``max(0.5, 2 × the most frequent label's
  share)`` of the test images (capped at 0.99);
- ``surrogates_disjoint``: a perturbation crafted from images of the evaluated dataset used
  none of the downstream train/validation images (its recorded surrogate indices);
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
from .utils import Progress, generator

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


def independent_perturbed(p: Perturbation, x: torch.Tensor) -> torch.Tensor:
    """``p`` applied to ``x`` by a second, independent route (not ``Perturbation.apply``)."""
    d = p.delta.to(device=x.device, dtype=x.dtype)
    if tuple(d.shape[-2:]) != tuple(x.shape[-2:]):
        d = torch.nn.functional.interpolate(d, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    d = d.expand(x.shape[0], x.shape[1], -1, -1)
    if p.kind == "additive":
        return torch.minimum(torch.maximum(x + torch.minimum(torch.maximum(d, -_eps(p)), _eps(p)), zero(x)), one(x))
    m = p.mask.to(device=x.device, dtype=x.dtype)
    if tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
        m = torch.nn.functional.interpolate(m, size=tuple(x.shape[-2:]), mode="nearest")
    m = m.expand_as(x)
    return torch.where(m > 0.5, torch.minimum(torch.maximum(d, zero(x)), one(x)), x)


def _eps(p: Perturbation) -> torch.Tensor:
    return torch.tensor(float(p.eps))


def zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def one(x: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=x.dtype, device=x.device)


def check_perturbed_batch(
    x: torch.Tensor, evaluated: torch.Tensor, eps: float | None, expected: torch.Tensor | None = None
) -> dict:
    """The batch a perturbation entry was evaluated on, against the clean batch ``x``: in [0,1],
    within ``eps`` of ``x`` (None: a patch, not bounded), different from ``x``, and equal to
    ``expected`` (an independent computation) when given."""
    problems = []
    if evaluated.shape != x.shape:
        problems.append(f"evaluated batch is {tuple(evaluated.shape)}, clean batch {tuple(x.shape)}")
    else:
        diff = (evaluated - x).abs()
        linf = float(diff.max())
        if not bool(torch.isfinite(evaluated).all()):
            problems.append("evaluated images hold NaN or inf")
        if float(evaluated.min()) < 0 or float(evaluated.max()) > 1:
            problems.append(
                f"evaluated images leave [0,1] ({float(evaluated.min()):.4g}..{float(evaluated.max()):.4g})"
            )
        if eps is not None and linf > eps + 1e-5:
            problems.append(f"evaluated images are {linf:.5f} from the clean ones in L∞, more than ε = {eps:.5f}")
        if linf == 0.0:
            problems.append("evaluated images equal the clean ones: the perturbation was not applied")
        if expected is not None:
            err = float((evaluated - expected.to(evaluated)).abs().max())
            if err > 1e-5:
                problems.append(f"evaluated images differ from an independent clamp(x + δ) by {err:.3g}")
    return {
        "passed": not problems,
        "detail": "; ".join(problems) or "applied, in [0,1] and within ε; matches an independent computation",
    }


def check_prediction_collapse(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fires when one predicted class covers more of the test set than the labels justify."""
    pred, labels = pred.flatten().cpu(), labels.flatten().cpu()
    n = max(len(pred), 1)
    top_pred = int(torch.bincount(pred).max()) / n if len(pred) else 0.0
    top_label = int(torch.bincount(labels).max()) / n if len(labels) else 0.0
    limit = min(0.99, max(0.5, 2 * top_label))
    cls = int(torch.bincount(pred).argmax()) if len(pred) else -1
    ok = top_pred <= limit
    return {
        "passed": ok,
        "top_class": cls,
        "top_class_share": round(top_pred, 4),
        "limit": round(limit, 4),
        "detail": f"most frequent prediction (class {cls}) on {100 * top_pred:.1f}% of {n} images "
        f"(limit {100 * limit:.0f}%)"
        + ("" if ok else ": the model answers nearly one class; its accuracies mean little"),
    }


def check_surrogates_disjoint(perturbations: dict, dataset: str, split_indices: dict[str, torch.Tensor]) -> dict:
    """Perturbations crafted from images of ``dataset`` must share no index with its
    train/validation splits (``split_indices``: split name -> dataset indices)."""
    rows, bad = {}, []
    used = {k: set(v.tolist()) for k, v in split_indices.items()}
    for name, p in perturbations.items():
        rec = (getattr(p, "config", None) or {}).get("surrogate_data") or {}
        if not rec or rec.get("dataset") != dataset or not rec.get("indices"):
            rows[name] = {
                "checked": False,
                "surrogate_dataset": rec.get("dataset"),
                "why": "other dataset or unrecorded",
            }
            continue
        idx = set(int(i) for i in rec["indices"])
        shared = {k: len(idx & v) for k, v in used.items()}
        rows[name] = {"checked": True, "surrogate_dataset": dataset, "shared": shared}
        if any(shared.values()):
            bad.append(f"{name}: {', '.join(f'{v} {k}' for k, v in shared.items() if v)} image(s) shared")
    return {
        "passed": not bad,
        "perturbations": rows,
        "detail": "; ".join(bad) + " -- the attacker used the defender's own images"
        if bad
        else f"{sum(r['checked'] for r in rows.values())} perturbation(s) crafted from this dataset share no "
        "train/val image",
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


def check_pgd_loss_rises(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, wb: dict, seed: int = 0, attack_model: nn.Module | None = None
) -> dict:
    """The white-box PGD run at ``wb["eps"]`` (on ``attack_model``, default ``model``: an
    equivalent copy such as genaf.fold's) raises its loss."""
    return _pgd_loss_rises(model, x, y, wb, seed, attack_model)[0]


def _pgd_loss_rises(model, x, y, wb: dict, seed: int, attack_model) -> tuple[dict, torch.Tensor]:
    """:func:`check_pgd_loss_rises` and the adversarial images of its PGD run, which are
    :func:`whitebox_curve`'s at ``wb["eps"]`` (the same settings and seed)."""
    trace: list[float] = []
    xa = _wb_pgd(attack_model if attack_model is not None else model, x, y, wb, float(wb["eps"]), seed, trace)
    first, last = trace[0], trace[-1]
    rose = last > first + 1e-6 * max(1.0, abs(first))
    return {
        "passed": bool(rose),
        "loss_start": first,
        "loss_end": last,
        "detail": f"PGD loss {first:.4g} -> {last:.4g}"
        + ("" if rose else ": it did not rise (masked or zero input gradients?)"),
    }, xa


def whitebox_curve(
    model, x, y, wb: dict, eps_list, seed: int = 0, bar=None, attack_model=None, known=None
) -> dict[float, float]:
    """White-box PGD robust accuracy of ``model`` at each ε, with the same attack seed for every
    ε (``bar``: a genaf.utils.Progress told of each ε done). The attack runs ``attack_model``
    (default ``model``). ``known``: ε -> the robust accuracy this very PGD run already measured
    (:func:`check_pgd_loss_rises`'s run at ``wb["eps"]``): taken instead of attacking again."""
    out = {}
    atk = attack_model if attack_model is not None else model
    for e in eps_list:
        if float(e) in (known or {}):
            out[float(e)] = float(known[float(e)])
            continue
        out[float(e)] = _acc(model, _wb_pgd(atk, x, y, wb, float(e), seed), y)
        if bar is not None:
            bar.update(1, f"PGD at ε={255 * float(e):.1f}/255: robust acc {100 * out[float(e)]:.1f} %")
    return out


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


def whitebox_key(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, wb: dict, seed: int, attack_model: nn.Module | None = None
) -> str:
    """A digest of everything the white-box self-checks depend on: the model's class and every
    parameter and buffer, the images and labels, the PGD settings, the seed, the device type,
    the genaf and torch versions and, where the attack runs on another module
    (``attack_model``, such as genaf.fold's copy, which rounds differently), that module's
    class, parameters and buffers. Two runs with one key compute the same numbers."""
    import hashlib
    import json

    from . import __version__

    h = hashlib.sha256()
    meta = [type(model).__qualname__, str(x.device.type), __version__, torch.__version__, seed, wb]
    tensors = list(model.state_dict().items())
    if attack_model is not None and attack_model is not model:  # (the model itself: the keys of before)
        meta.append(f"attacked: {type(attack_model).__qualname__}")
        tensors += [(f"attacked/{k}", v) for k, v in attack_model.state_dict().items()]
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in tensors + [("x", x), ("y", y)]:
        shape = t.shape
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbations: dict[str, Perturbation] | None = None,
    whitebox: dict | None = None,
    n_classes: int | None = None,
    seed: int = 0,
    log=None,
    reuse: dict | None = None,
    attack_model: nn.Module | None = None,
) -> dict:
    """Every check on one batch of test images ``x`` (labels ``y``); the model is in eval mode.
    ``attack_model``: what the white-box PGD runs attack (default ``model``; genaf.evaluation
    passes the BatchNorm-folded copy of genaf.fold, the same function up to float rounding);
    every accuracy is the model's own.
    ``log``: where progress lines go off a terminal (one per white-box PGD run).
    ``reuse``: an earlier report of these checks (a run's ``metrics.json`` ``checks``): when its
    ``whitebox_key`` equals this call's (:func:`whitebox_key`: same model weights, images, PGD
    settings, seed, device type, versions and what was attacked) and it holds every ε needed, its white-box PGD
    results are taken instead of recomputed (``whitebox_reused`` says so); the other checks
    always run."""
    out = {"n_images": int(len(x)), "logits": check_logits(model, x, n_classes)}
    if whitebox:
        base = float(whitebox["eps"])
        eps_list = sorted({min(1.0, f * base) for f in EPS_FRACTIONS})
        additive = {
            n: p for n, p in (perturbations or {}).items() if p.kind == "additive" and 0 < p.eps <= 1 and p.linf() > 0
        }
        eps_list = sorted(set(eps_list) | {float(p.eps) for p in additive.values()})
        key = whitebox_key(model, x, y, whitebox, seed, attack_model)
        old = reuse if isinstance(reuse, dict) and reuse.get("whitebox_key") == key else {}
        old_curve = old.get("whitebox_curve") or {}
        if "pgd_loss_rises" in old and all(f"{e:.6f}" in old_curve for e in eps_list):
            out["pgd_loss_rises"] = old["pgd_loss_rises"]
            curve = {e: float(old_curve[f"{e:.6f}"]) for e in eps_list}
            out["whitebox_reused"] = True
            if log is not None:
                log(
                    f"self-checks on {len(x)} images: white-box PGD results reused from the earlier evaluation "
                    "(same weights, images, attack settings and seed)"
                )
        else:
            # the loss check's PGD run is the curve's run at the base ε (same settings and seed)
            bar = Progress(len(eps_list), f"self-checks on {len(x)} images", unit="PGD runs", log=log)
            with bar:
                out["pgd_loss_rises"], xa = _pgd_loss_rises(model, x, y, whitebox, seed, attack_model)
                known = {base: _acc(model, xa, y)}
                bar.update(
                    1,
                    f"PGD at ε={255 * base:.1f}/255: {out['pgd_loss_rises']['detail']}, "
                    f"robust acc {100 * known[base]:.1f} %",
                )
                curve = whitebox_curve(
                    model, x, y, whitebox, eps_list, seed, bar=bar, attack_model=attack_model, known=known
                )
        out["whitebox_key"] = key
        out["whitebox_curve"] = {f"{e:.6f}": curve[e] for e in eps_list}
        out["eps_monotonic"] = check_eps_monotonic({e: curve[e] for e in eps_list if e <= min(1.0, 2 * base)})
        if additive:
            transfer = {n: (float(p.eps), _acc(model, p.apply(x), y)) for n, p in additive.items()}
            out["whitebox_vs_transfer"] = check_whitebox_vs_transfer(curve, transfer, len(x))
    out["failed"] = failed_checks(out)
    return out


def failed_checks(report: dict) -> list[str]:
    """Names of the checks in ``report`` that did not pass (per-entry checks as ``name:entry``)."""
    bad = [k for k, v in report.items() if isinstance(v, dict) and v.get("passed") is False]
    for name, v in (report.get("perturbation_applied") or {}).items():
        if isinstance(v, dict) and v.get("passed") is False:
            bad.append(f"perturbation_applied:{name}")
    return bad
