"""Clean accuracy, robust accuracy, fooling rate, attack success rate and relative decline.

Every rate is averaged per sample. Per-sample predictions are kept by dataset index so that
results can be joined across runs and attacks.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .attacks.autoattack import VERSIONS as AA_VERSIONS
from .attacks.autoattack import autoattack
from .attacks.perturbation import Perturbation
from .attacks.whitebox import fgsm, pgd
from .checks import (
    check_perturbed_batch,
    check_prediction_collapse,
    check_surrogates_disjoint,
    failed_checks,
    independent_perturbed,
    run_checks,
)
from .data import ImageSet
from .errors import DataError
from .utils import Progress, generator


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


def whitebox_attacks(wb: dict, seed: int = 0, log=None, gen: torch.Generator | None = None) -> dict:
    """name -> (run(model, x, y) -> x_adv, its description) for the white-box evaluation.

    ``wb`` holds the PGD settings (``eps``, ``step``, ``steps``, ``restarts``) and switches
    ``fgsm`` and ``autoattack`` (``autoattack_version``: ``standard`` = APGD-CE, APGD-T, FAB-T and
    Square, or ``apgd`` = the first two; ``autoattack_steps`` iterations, ``autoattack_queries``
    Square queries). ``gen``: PGD's random starts (default: the generator of unit
    ``evaluate:pgd``; a data-parallel evaluation passes its ``Team.generator`` of that unit).
    """
    eps = float(wb["eps"])
    gen = gen if gen is not None else generator(seed, "evaluate:pgd")
    out = {}
    if wb.get("fgsm"):
        out["fgsm-wb"] = (lambda m, x, y: fgsm(m, x, y, eps), {"attack": "fgsm", "eps": eps})
    steps, restarts = int(wb["steps"]), int(wb.get("restarts", 1))
    out[f"pgd{steps}-wb"] = (
        lambda m, x, y: pgd(m, x, y, eps, wb["step"], steps, random_start=True, restarts=restarts, gen=gen),
        {"attack": "pgd", "eps": eps, "step": wb["step"], "steps": steps, "restarts": restarts},
    )
    if wb.get("autoattack"):
        aa_steps = int(wb.get("autoattack_steps", 100))
        version = str(wb.get("autoattack_version", "standard"))
        queries = int(wb.get("autoattack_queries", 5000))
        calls = iter(range(1 << 30))  # a different (seeded) random start for every batch
        desc = {
            "attack": f"autoattack {version} ({', '.join(AA_VERSIONS.get(version, ()))})",
            "eps": eps,
            "steps": aa_steps,
            "version": version,
            "per_attack": {},  # points each attack ran on and fooled, summed over the batches
        }
        if version == "standard":
            desc["square_queries"] = queries

        def run_aa(m, x, y):
            tally: dict = {}
            run_seed = seed * 100003 + next(calls)
            xa = autoattack(
                m, x, y, eps, steps=aa_steps, seed=run_seed, version=version, n_queries=queries, log=tally,
                progress_log=log,
            )
            for k, v in tally.items():
                tot = desc["per_attack"].setdefault(k, {"attacked": 0, "fooled": 0})
                tot["attacked"] += v["attacked"]
                tot["fooled"] += v["fooled"]
            return xa

        out["autoattack-wb"] = (run_aa, desc)
    return out


def evaluate_model(
    model: nn.Module,
    test: ImageSet,
    perturbations: dict[str, Perturbation] | None = None,
    whitebox: dict | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    seed: int = 0,
    start_encoder_hash: str | None = None,
    checks: bool = True,
    check_whitebox: dict | None = None,
    n_check: int = 256,
    adversarial: dict[str, tuple[torch.Tensor, dict]] | None = None,
    split_indices: dict[str, torch.Tensor] | None = None,
    log=None,
    parallel=None,
    reuse_checks: dict | None = None,
    fold_bn: bool = True,
) -> dict:
    """Evaluate ``model`` on ``test`` against universal perturbations, per-sample DAEs and
    white-box PGD.

    Args:
        test: the images evaluated (any split: ``test.split`` and ``test.dataset`` are recorded
            in every entry).
        perturbations: name -> Perturbation (DAEs crafted on some encoder, applied as is).
        whitebox: e.g. ``{"eps": 8/255, "step": 2/255, "steps": 10, "restarts": 1}`` for PGD on
            the evaluated model itself (stronger than the threat model); None skips it.
        start_encoder_hash: hash of the encoder the model was fine-tuned from; perturbations
            crafted on another encoder are marked as transfer attacks, with the encoder named.
        checks: run the self-checks of :mod:`genaf.checks` on the first ``n_check`` test
            images (their white-box parts use ``check_whitebox``, default ``whitebox``), check
            every evaluated perturbed batch and the spread of the clean predictions.
        adversarial: name -> (source, description) of per-sample DAEs (crafted on the original
            encoder): ``source`` is either the adversarial images aligned with ``test``
            (N, C, H, W) in [0,1], crafted beforehand, or a function ``x -> x_adv`` called on
            each clean batch (its time is recorded as the attack's cost).
        split_indices: split name -> dataset indices of the model's train/val splits: a
            perturbation crafted from this dataset is checked to share none of them.
        log: where progress lines go off a terminal (genaf.utils.Progress): one per batch for
            the clean images and the universal perturbations, one per batch and per-sample or
            white-box attack, one per self-check PGD run.
        parallel: the processes of a torchrun run (``genaf.distributed.Team``): each evaluates
            its rows of every batch (PGD with the random starts one process draws for them) and
            the per-sample results are gathered, so every process returns what one process
            computes; the self-checks run on rank 0 alone. Clean, FGSM and PGD results equal one
            process's; AutoAttack's random draws depend on the rows a process holds. Universal
            perturbations and per-sample DAEs are not sharded (refused).
        reuse_checks: an earlier ``checks`` report of this model on these images (see
            :func:`genaf.checks.run_checks`): its white-box PGD runs are reused when nothing
            they depend on changed.
        fold_bn: the white-box attacks (and the self-checks' PGD runs) run on a copy of the model
            with every BatchNorm folded into the convolution before it (:mod:`genaf.fold`: the
            same function in eval mode up to float rounding, fewer kernels per pass); every
            prediction scored is the model's own. ``attack_fold`` in each white-box attack's entry
            and in ``checks`` says what was folded. False attacks the model itself.
    Returns:
        the ``metrics.json`` dict (without run metadata) and per-sample predictions.
    """
    device = torch.device(device)
    perturbations = perturbations or {}
    adversarial = adversarial or {}
    team = parallel
    sharded = team is not None and team.distributed
    if sharded and (perturbations or adversarial):
        from .errors import ConfigError

        raise ConfigError(
            "perturbations and per-sample DAEs are not evaluated across processes yet; evaluate them in one process"
        )
    pgd_gen = team.generator(seed, "evaluate:pgd") if sharded else None
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    attack_model, fold_info = _attack_model(model, fold_bn and bool(whitebox or checks))
    preds: dict[str, list[torch.Tensor]] = {"clean": []}
    for name in list(perturbations) + list(adversarial):
        if name in preds:
            raise DataError(f"two evaluation entries are both called '{name}'; give them distinct names")
        preds[name] = []
    wb_attacks = whitebox_attacks(whitebox, seed, log=log, gen=pgd_gen) if whitebox else {}
    for name in wb_attacks:
        preds[name] = []
    labels, indices = [], []
    n_classes = getattr(model, "config", {}).get("num_classes")
    if len(test) == 0:
        raise DataError("the test set is empty: nothing to evaluate (check the dataset path and --n-test)")
    if n_classes is not None and int(test.labels.max()) >= n_classes:
        raise DataError(
            f"test labels go up to {int(test.labels.max())} but the model has {n_classes} classes: "
            "evaluate on the dataset the model was fine-tuned for"
        )
    for name, (xa, _) in adversarial.items():
        if torch.is_tensor(xa) and len(xa) != len(test):
            raise DataError(f"per-sample DAE '{name}' holds {len(xa)} images for {len(test)} evaluated images")
    report = None
    bar = None
    applied: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    try:
        if checks and not (sharded and not team.is_main):
            sub = test.subset(n_check)
            report = run_checks(
                model,
                sub.float_images().to(device),
                sub.labels.to(device),
                perturbations,
                check_whitebox if check_whitebox is not None else whitebox,
                n_classes,
                seed,
                log=log,
                reuse=reuse_checks,
                attack_model=attack_model,
            )
        start = 0
        n_batches = math.ceil(len(test) / batch_size)
        heavy = list(adversarial) + list(wb_attacks)
        what = f"{len(test)} {test.split} images" if test.split else f"{len(test)} images"
        bar = Progress(n_batches * (1 + len(heavy)), f"evaluating on {what}", unit="attack batches", log=log)
        part = (team.rank, team.world) if sharded else None
        for b, (x, y, idx) in enumerate(test.batches(batch_size, device=device, part=part), 1):
            at = f"batch {b}/{n_batches}"
            if sharded:  # this process's rows of the batch; PGD draws for the whole batch
                team.set_rows(pgd_gen, min(batch_size, len(test) - (b - 1) * batch_size))
            labels.append(y.cpu())
            indices.append(idx.cpu())
            preds["clean"].append(_predict(model, x).cpu())
            first = start == 0
            for name, p in perturbations.items():
                xp = p.apply(x)
                if first and checks:
                    applied[name] = check_perturbed_batch(
                        x, xp, float(p.eps) if p.kind == "additive" else None, independent_perturbed(p, x)
                    )
                preds[name].append(_predict(model, xp).cpu())
            bar.update(1, f"{at}: clean" + (f" + {len(perturbations)} universal" if perturbations else ""))
            for name, (source, desc) in adversarial.items():
                t0 = time.time()
                if torch.is_tensor(source):
                    xa = source[start : start + len(x)].to(device=device, dtype=x.dtype)
                else:  # crafted now, batch by batch
                    xa = source(x)
                seconds[name] = seconds.get(name, 0.0) + time.time() - t0
                if first and checks:
                    applied[name] = check_perturbed_batch(x, xa, desc.get("eps"))
                preds[name].append(_predict(model, xa).cpu())
                bar.update(1, f"{at}: {name} (per-sample, {seconds[name]:.1f} s so far)")
            for name, (run, _) in wb_attacks.items():
                t0 = time.time()
                preds[name].append(_predict(model, run(attack_model, x, y)).cpu())
                seconds[name] = seconds.get(name, 0.0) + time.time() - t0
                bar.update(1, f"{at}: {name} (white-box, {seconds[name]:.1f} s so far)")
            start += len(x)
    finally:
        if bar is not None:
            bar.close()
        for m, t in was:
            m.train(t)
    y = torch.cat(labels)
    p = {k: torch.cat(v) for k, v in preds.items()}
    if sharded:  # every process's rows, batch by batch, in the order of one process
        y, p, indices = _gather_batches(team, labels, preds, indices)
        for _, desc in wb_attacks.values():
            if "per_attack" in desc:  # AutoAttack's tallies: summed over the processes
                every = team.merge({str(team.rank): desc["per_attack"]})
                total: dict = {}
                for tally in every.values():
                    for k, v in tally.items():
                        tot = total.setdefault(k, {"attacked": 0, "fooled": 0})
                        tot["attacked"] += v["attacked"]
                        tot["fooled"] += v["fooled"]
                desc["per_attack"] = total
    clean = p["clean"]
    where = {"dataset": test.dataset, "split": test.split, "n": int(len(y))}
    out = {
        "clean_acc": float((clean == y).float().mean()),
        "n_test": int(len(y)),
        "evaluated_on": where,
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
        if name in wb_attacks:
            out["attacks"][name] = {
                "type": "white-box",
                **wb_attacks[name][1],
                "attack_fold": fold_info,
                **where,
                "seconds": round(seconds.get(name, 0.0), 2),
            }
        elif name in adversarial:
            desc = dict(adversarial[name][1])
            if not torch.is_tensor(adversarial[name][0]):
                desc["seconds"] = round(seconds.get(name, 0.0), 2)
                desc["images_per_second"] = round(len(y) / max(seconds.get(name, 0.0), 1e-9), 1)
            out["attacks"][name] = {"type": "per-sample", **desc, **where}
        else:
            pert = perturbations[name]
            transfer = bool(start_encoder_hash and pert.encoder_hash and pert.encoder_hash != start_encoder_hash)
            out["attacks"][name] = {
                "type": "universal",
                "attack": pert.attack,
                "eps": pert.eps,
                "kind": pert.kind,
                "surrogate": pert.surrogate,
                "encoder_hash": pert.encoder_hash,
                "crafted_on": pert.encoder_source or pert.encoder_hash,
                "seed": pert.seed,
                "transfer": transfer,
                **({"transfer_from": pert.encoder_source or pert.encoder_hash} if transfer else {}),
                **where,
            }
    if report is not None:
        if "whitebox_curve" in report:
            report["attack_fold"] = fold_info
        report["perturbation_applied"] = applied
        report["prediction_collapse"] = check_prediction_collapse(clean, y)
        if split_indices is not None and perturbations:
            report["surrogates_disjoint"] = check_surrogates_disjoint(perturbations, test.dataset, split_indices)
        report["failed"] = failed_checks(report)
        out["checks"] = report
    per_sample = {"index": torch.cat(indices).tolist(), "label": y.tolist(), **{k: v.tolist() for k, v in p.items()}}
    return {"metrics": out, "per_sample": per_sample}


def _attack_model(model: nn.Module, fold: bool) -> tuple[nn.Module, dict]:
    """What the white-box attacks run on: the BatchNorm-folded copy of ``model`` (in eval mode)
    when ``fold`` and something folds, else ``model``; and the record of it."""
    if not fold:
        return model, {"fold_bn": False, "folded_pairs": 0}
    from .fold import AttackFold

    folder = AttackFold(model)
    return folder(model), {"fold_bn": True, **folder.info()}


def _gather_batches(team, labels: list, preds: dict, indices: list):
    """Labels, predictions and indices of every process, batch after batch: one gather per batch
    of a (rows, columns) table, so the result is in the order one process produces."""
    names = list(preds)
    ys, ps, idx = [], {k: [] for k in names}, []
    for b in range(len(labels)):
        cols = [labels[b].long(), indices[b].long()] + [preds[k][b].long() for k in names]
        rows = torch.stack(cols, 1) if len(labels[b]) else torch.zeros(0, len(cols), dtype=torch.long)
        table = team.gather_rows(rows)
        ys.append(table[:, 0])
        idx.append(table[:, 1])
        for j, k in enumerate(names):
            ps[k].append(table[:, 2 + j])
    return torch.cat(ys), {k: torch.cat(v) for k, v in ps.items()}, idx
