"""Clean accuracy, robust accuracy, fooling rate, attack success rate and relative decline.

Every rate is averaged per sample. Per-sample predictions are kept by dataset index so that
results can be joined across runs and attacks.
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks.perturbation import Perturbation
from .attacks.whitebox import pgd
from .data import ImageSet
from .utils import generator


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def rates(clean_pred: torch.Tensor, adv_pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """The named metrics of one attack from per-sample predictions."""
    ca = float((clean_pred == labels).float().mean())
    ra = float((adv_pred == labels).float().mean())
    return {
        "clean_acc": ca,
        "robust_acc": ra,
        "fooling_rate": float((adv_pred != clean_pred).float().mean()),
        "attack_success_rate": 1.0 - ra,  # defined as 1 - RA (papers differ; named explicitly)
        "relative_decline": (ca - ra) / ca if ca > 0 else 0.0,
    }


def evaluate_model(
    model: nn.Module,
    test: ImageSet,
    perturbations: dict[str, Perturbation] | None = None,
    whitebox: dict | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    seed: int = 0,
    start_encoder_hash: str | None = None,
) -> dict:
    """Evaluate ``model`` on ``test`` against universal perturbations and white-box PGD.

    Args:
        perturbations: name -> Perturbation (DAEs crafted on some encoder, applied as is).
        whitebox: e.g. ``{"eps": 8/255, "step": 2/255, "steps": 10, "restarts": 1}`` for PGD on
            the evaluated model itself (stronger than the threat model); None skips it.
        start_encoder_hash: hash of the encoder the model was fine-tuned from; perturbations
            crafted on another encoder are marked as transfer attacks.
    Returns:
        the ``metrics.json`` dict (without run metadata) and per-sample predictions.
    """
    device = torch.device(device)
    perturbations = perturbations or {}
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    preds: dict[str, list[torch.Tensor]] = {"clean": []}
    for name in perturbations:
        preds[name] = []
    wb_name = None
    if whitebox:
        wb_name = f"pgd{whitebox.get('steps', 10)}-wb"
        preds[wb_name] = []
    labels, indices = [], []
    gen = generator(seed, "evaluate:pgd")
    try:
        for x, y, idx in test.batches(batch_size, device=device):
            labels.append(y.cpu())
            indices.append(idx.cpu())
            preds["clean"].append(_predict(model, x).cpu())
            for name, p in perturbations.items():
                preds[name].append(_predict(model, p.apply(x)).cpu())
            if wb_name:
                xa = pgd(
                    model,
                    x,
                    y,
                    whitebox["eps"],
                    whitebox["step"],
                    whitebox["steps"],
                    random_start=True,
                    restarts=whitebox.get("restarts", 1),
                    gen=gen,
                )
                preds[wb_name].append(_predict(model, xa).cpu())
    finally:
        for m, t in was:
            m.train(t)
    y = torch.cat(labels)
    p = {k: torch.cat(v) for k, v in preds.items()}
    clean = p["clean"]
    out = {
        "clean_acc": float((clean == y).float().mean()),
        "n_test": int(len(y)),
        "robust_acc": {},
        "fooling_rate": {},
        "attack_success_rate": {},
        "relative_decline": {},
        "attacks": {},
    }
    for name in p:
        if name == "clean":
            continue
        r = rates(clean, p[name], y)
        for k in ("robust_acc", "fooling_rate", "attack_success_rate", "relative_decline"):
            out[k][name] = r[k]
        if name == wb_name:
            out["attacks"][name] = {"type": "white-box", "attack": "pgd", **whitebox}
        else:
            pert = perturbations[name]
            out["attacks"][name] = {
                "type": "universal",
                "attack": pert.attack,
                "eps": pert.eps,
                "kind": pert.kind,
                "surrogate": pert.surrogate,
                "encoder_hash": pert.encoder_hash,
                "seed": pert.seed,
                "transfer": bool(start_encoder_hash and pert.encoder_hash and pert.encoder_hash != start_encoder_hash),
            }
    per_sample = {"index": torch.cat(indices).tolist(), "label": y.tolist(), **{k: v.tolist() for k, v in p.items()}}
    return {"metrics": out, "per_sample": per_sample}
