"""Does it matter for stage 2 which layers genaf's cheap scorer selects? Stage 2 run from one
stage-1 model with genaf's selection and with the reference procedure's selection, several
seeds each: validation clean accuracy and validation DAE robust accuracy, and whether the two
selections' results are within seed noise of each other (genaf issue 16, defect 3).

    python benchmarks/stage2_selection.py [--quick] --out FILE.json [--work DIR] [--width 8 | --vit] [--seeds 0,1,2,3,4]

What it does (all on the CPU unless ``--device cuda``; ``speed`` is benchmarks/speed.py):

1. The stage-1 model: ``speed.width_model`` — a CIFAR-stem ResNet-18 of ``--width`` (8) from
   seeded random weights with the MLP head, trained with ``genaf-stage1`` on speed.py's
   ``--quick`` demo split (1,024 train, 256 validation, 512 test images; 1 clean + 2 FGSM-RS
   epochs, encoder lr 2e-3). The model of benchmarks/RESULTS.md run 6 on which genaf's scorer
   agrees with the reference on only 2 of 4 layers. With ``--vit``: ``speed.vit_model``, the
   shipped ``demo-vit`` encoder fine-tuned with ``genaf-stage1`` PGD-10 as speed.py's stage2
   part scores it (run 8: 2 of 4 layers there too). Cached in ``--work``.
2. Its probe (``speed.stage2_probe``: PGD-10 at 8/255 on the first 256 validation images),
   genaf's robust sensitivity with the Gen-AF defaults (the call of ``speed.score_stage2``)
   and the reference procedure (``speed.reference_sensitivity``); each selection is the
   k = max(1, ⌊0.2·layers⌋) lowest (``select_redundant``).
3. DAEs crafted on the model's ORIGINAL encoder (the random-weight encoder it was trained
   from; with ``--vit`` the shipped ``demo-vit``) from the demo data's surrogate reserve,
   disjoint from every split:
   ``genaf.demo.craft_demo_perturbations`` (``l4a-base`` and ``ssp-universal``, ``cpu``
   preset, ε 16/255; and the ``uniform-noise`` control). Cached in ``--work``.
4. For each selection and seed: genaf's ``Stage2`` (the ``genaf`` method's stage 2 with every
   option at its Gen-AF default except ``stage2_epochs`` = 2, the bench's, and
   ``stage2_layers`` = the selection) run by genaf's Trainer from a copy of the stage-1 model,
   with the training options the stage-1 model was trained with (batch 128, PGD-10
   validation on 128 images). The seed sets the Trainer's batch order and random draws; the
   stage-1 model, the data and the DAEs are the same for every run. Then validation clean
   accuracy and validation robust accuracy under each DAE (DAE-RA: the mean over
   ``l4a-base`` and ``ssp-universal``); the test split's figures are recorded beside them.

The verdict's rule is ``RULE`` below, fixed before any run of this script.

``--quick``: a tiny split, width 4, 1 stage-1 epoch, a 64-image probe, 1 stage-2 epoch,
2-iteration DAEs and 2 seeds — a check that the script runs, not a measurement.
Writes one JSON object to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: the stage-1 model, the probe, the reference)

from genaf.demo import SETTINGS, craft_demo_perturbations  # noqa: E402
from genaf.encoders import load_encoder  # noqa: E402
from genaf.evaluation import evaluate_model  # noqa: E402
from genaf.methods.base import create_method  # noqa: E402
from genaf.methods.genaf import GENAF_DEFAULTS  # noqa: E402
from genaf.methods.sensitivity import robust_sensitivity, select_redundant, weight_units  # noqa: E402
from genaf.train import TrainConfig, Trainer  # noqa: E402

DAES = ("l4a-base", "ssp-universal")
SELECTIONS = ("genaf", "reference")

RULE = (
    "For each of validation clean accuracy and validation DAE-RA (the mean of the l4a-base and "
    "ssp-universal robust accuracies), the two selections are within seed noise when "
    "|mean(genaf) - mean(reference)| <= max(std(genaf), std(reference)), std being the sample "
    "standard deviation over the seeds (n - 1); the verdict is 'within seed noise' only when both "
    "metrics are. The per-seed paired differences (same seed, same batch order) are reported "
    "beside it and do not enter the verdict."
)

TINY_PLAN = {
    "demo": {"n_train": 256, "n_val": 128, "n_test": 128, "n_surrogate": 64},
    "epochs": 1,
    "probe": 64,
}


def within_noise(a: list[float], b: list[float]) -> dict:
    """RULE for one metric: the means, sample stds, difference of means and the decision."""
    ma, mb = statistics.mean(a), statistics.mean(b)
    sa, sb = statistics.stdev(a), statistics.stdev(b)
    diff = ma - mb
    return {
        "genaf_mean": ma,
        "genaf_std": sa,
        "reference_mean": mb,
        "reference_std": sb,
        "difference_of_means": diff,
        "seed_std": max(sa, sb),
        "paired_differences": [x - y for x, y in zip(a, b)],
        "within_seed_noise": abs(diff) <= max(sa, sb),
    }


def accuracies(model, data, perts: dict, dev) -> dict:
    """Clean and per-DAE robust accuracy on the validation and the test split."""
    out = {}
    for split, images in (("val", data.val), ("test", data.test)):
        m = evaluate_model(model, images, perturbations=perts, whitebox=None, device=dev, checks=False)["metrics"]
        ra = {name: m["robust_acc"][name] for name in perts}
        out[split] = {"clean": m["clean_acc"], "robust": ra, "dae_ra": sum(ra[d] for d in DAES) / len(DAES)}
    return out


class _Stage2Only:
    """What the Trainer needs of a method: its stages; here the genaf method's stage 2 alone."""

    def __init__(self, cfg: dict) -> None:
        meth = create_method("genaf", **cfg)
        self._stages = [s for s in meth.stages() if s.name == "stage2"]
        assert len(self._stages) == 1

    def stages(self):
        return self._stages


def run_stage2(model, data, dev, layers: list[str], epochs: int, seed: int, folder: Path) -> tuple[object, dict]:
    """genaf's stage 2 with ``stage2_layers = layers`` on a copy of ``model``; returns the
    fine-tuned model and what the stage recorded."""
    m = copy.deepcopy(model)
    method = _Stage2Only({"stage2_epochs": epochs, "stage2_layers": list(layers)})
    tcfg = TrainConfig(
        seed=seed,
        batch_size=SETTINGS["full"]["batch_size"],
        n_val_robust=GENAF_DEFAULTS["guard_size"],
        val_steps=10,
        device=str(dev),
        progress=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(m, data, method, tcfg, folder, dev, log=lambda *_: None)
    artifacts = trainer.fit()
    (setup,) = artifacts["setup"].values()
    return m.eval(), {
        "selected": setup["selected"],
        "history": trainer.history,
        "kept_epoch": next(iter(artifacts.get("selected_epoch", {}).values()), None),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON file to write (required)")
    ap.add_argument("--work", default=None, help="folder for the stage-1 model and DAEs (default: a temporary one)")
    ap.add_argument("--width", type=int, default=8, help="width of the stage-1 ResNet-18 (default 8)")
    ap.add_argument(
        "--vit",
        action="store_true",
        help="the stage-1 model is the demo-vit encoder fine-tuned with genaf-stage1 PGD-10 (speed.vit_model) "
        "instead of the width model (default off)",
    )
    ap.add_argument("--seeds", default="0,1,2,3,4", help="stage-2 seeds per selection, >= 2 (default 0,1,2,3,4)")
    ap.add_argument("--stage2-epochs", type=int, default=2, help="stage-2 epochs (default 2, the bench's)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default cpu)")
    ap.add_argument("--quick", action="store_true", help="a tiny run that checks the script (default off)")
    a = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds wants comma-separated whole numbers, got '{a.seeds}'")
    if a.quick and a.seeds == "0,1,2,3,4":
        seeds = [0, 1]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds wants at least 2 distinct seeds (a standard deviation), got '{a.seeds}'")
    if a.width < 1:
        ap.error(f"--width wants a positive width, got {a.width}")
    if a.vit and a.width != 8:
        ap.error("--vit scores the demo-vit model; --width is for the ResNet-18 model: give one of them")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dev = torch.device(a.device)
    plan = TINY_PLAN if a.quick else speed.PLAN["quick"]
    width = 4 if a.quick and a.width == 8 else a.width
    epochs2 = 1 if a.quick and a.stage2_epochs == 2 else a.stage2_epochs
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = None
    if a.work:
        work = Path(a.work)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="genaf-stage2-selection-")
        work = Path(tmp.name)
    if a.quick:
        work = work / "tiny"  # never mixed with the measured run's cached models
    work.mkdir(parents=True, exist_ok=True)
    cpu: dict[str, float] = {}

    def timed(key, fn):
        c0 = time.process_time()
        out = fn()
        cpu[key] = round(time.process_time() - c0, 1)
        return out

    try:
        data = speed.demo_data(plan, 0)
        # 1. the stage-1 model (seed 0), as speed.py builds it
        size = "quick" if plan is speed.PLAN["quick"] else "full"
        if a.vit:
            model = timed("stage1_model", lambda: speed.vit_model(plan, data, dev, work, 0, log=log))
            tag = f"vit-pgd10-{size}-seed0"
            original = load_encoder("demo-vit")
            what = f"demo-vit + MLP head, genaf-stage1 PGD-10 ({plan['epochs']} epochs; speed.vit_model), seed 0"
        else:
            model = timed("stage1_model", lambda: speed.width_model(plan, data, dev, work, 0, width, log=log))
            tag = f"w{width}-scratch-{size}-seed0"
            original = load_encoder(f"file:{work / f'encoder-{tag}.safetensors'}")
            what = (
                f"ResNet-18 w{width} + MLP head from random weights, genaf-stage1 "
                f"(1 clean + {plan['epochs']} FGSM-RS epochs, encoder lr 2e-3; speed.width_model), seed 0"
            )
        # 2. the two selections on one probe
        cfg = GENAF_DEFAULTS
        adv, ys = speed.stage2_probe(model, data, dev, plan["probe"], 0)
        units = weight_units(model)
        k = max(1, int(cfg["stage2_k_fraction"] * len(units)))
        log(f"scoring {len(units)} layers on a probe of {len(adv)} PGD-10 examples (k = {k})")
        scores = {
            "genaf": timed(
                "genaf_scoring",
                lambda: robust_sensitivity(
                    model,
                    adv,
                    ys,
                    eta=cfg["eta"],
                    steps=cfg["sensitivity_steps"],
                    step_size=cfg["sensitivity_step"],
                    ascent_fraction=cfg["sensitivity_fraction"],
                    seed=0,
                ),
            ),
            "reference": timed(
                "reference_scoring", lambda: speed.reference_sensitivity(model, adv, ys, eta=cfg["eta"])
            ),
        }
        sel = {s: select_redundant(scores[s], k) for s in SELECTIONS}
        overlap = len(set(sel["genaf"]) & set(sel["reference"]))
        log(f"genaf selects {sel['genaf']}; the reference {sel['reference']} ({overlap}/{k} shared)")
        # 3. DAEs on the original encoder, from the surrogate reserve
        s = dict(SETTINGS["full"], **plan["demo"])
        perts = timed(
            "dae_crafting",
            lambda: craft_demo_perturbations(
                original, data, s, work / f"perturbations-{tag}", dev, 0, a.quick, log=lambda *_: None
            ),
        )
        before = accuracies(model, data, perts, dev)
        log(
            f"stage-1 model: validation clean {100 * before['val']['clean']:.1f} %, "
            f"DAE-RA {100 * before['val']['dae_ra']:.1f} %"
        )
        # 4. stage 2 per selection and seed
        runs: dict[str, list[dict]] = {s: [] for s in SELECTIONS}
        c0 = time.process_time()
        for seed in seeds:
            for name in SELECTIONS:
                tuned, rec = run_stage2(
                    model, data, dev, sel[name], epochs2, seed, work / f"stage2-{tag}-{name}-seed{seed}"
                )
                assert rec["selected"] == sel[name]
                acc = accuracies(tuned, data, perts, dev)
                runs[name].append({"seed": seed, **acc, "kept_epoch": rec["kept_epoch"], "history": rec["history"]})
                log(
                    f"stage 2, {name} selection, seed {seed}: validation clean {100 * acc['val']['clean']:.1f} %, "
                    f"DAE-RA {100 * acc['val']['dae_ra']:.1f} %"
                )
        cpu["stage2_runs"] = round(time.process_time() - c0, 1)
    finally:
        if tmp is not None:
            tmp.cleanup()

    def series(name, split, metric):
        return [r[split][metric] for r in runs[name]]

    comparison = {
        split: {
            metric: within_noise(series("genaf", split, metric), series("reference", split, metric))
            for metric in ("clean", "dae_ra")
        }
        for split in ("val", "test")
    }
    verdict = all(comparison["val"][m]["within_seed_noise"] for m in ("clean", "dae_ra"))
    res = {
        "command": "python benchmarks/stage2_selection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": a.device,
        },
        "quick": a.quick,
        "setting": {
            "stage1_model": what,
            "split": plan["demo"],
            "probe": f"{len(adv)} PGD-10 validation examples (speed.stage2_probe, seed 0)",
            "k": k,
            "stage2": f"genaf Stage2, Gen-AF defaults, stage2_epochs {epochs2}, stage2_layers = the selection",
            "daes": f"{', '.join(DAES)} (+ uniform-noise control), cpu preset, eps 16/255, crafted on the "
            f"original encoder ({'demo-vit' if a.vit else 'the random weights'}) from the surrogate reserve",
            "seeds": seeds,
        },
        "rule": RULE,
        "selected": sel,
        "topk_overlap": overlap / k,
        "scores": {n: [scores["genaf"][n], scores["reference"][n]] for n in units},
        "stage1_model_accuracy": before,
        "runs": runs,
        "comparison": comparison,
        "verdict": "within seed noise" if verdict else "NOT within seed noise",
        "cpu_seconds": cpu,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"genaf selects     {', '.join(sel['genaf'])}")
    print(f"reference selects {', '.join(sel['reference'])}  ({overlap}/{k} shared)")
    print(f"{'split':<5s} {'metric':<7s} {'genaf':>15s} {'reference':>15s} {'diff':>7s} {'seed std':>8s}  within")
    for split, rows in comparison.items():
        for metric, c in rows.items():
            print(
                f"{split:<5s} {metric:<7s} {100 * c['genaf_mean']:7.2f} ± {100 * c['genaf_std']:5.2f} "
                f"{100 * c['reference_mean']:7.2f} ± {100 * c['reference_std']:5.2f} "
                f"{100 * c['difference_of_means']:+7.2f} {100 * c['seed_std']:8.2f}  {c['within_seed_noise']}"
            )
    print(f"verdict (validation, {len(seeds)} seeds per selection): {res['verdict']}")
    print(f"wrote {a.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
