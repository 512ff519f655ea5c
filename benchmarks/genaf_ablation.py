"""Which Gen-AF configuration earns its place? An ablation on the demo protocol.

Every variant is fine-tuned on exactly the demo's data (same splits, seed, epochs, PGD) and
evaluated against the demo's DAEs (crafted once on the original encoder, ε = 16/255) and
white-box PGD-10. Finished variants are skipped when the command is run again.

    python benchmarks/genaf_ablation.py --out runs/ablation [--variants a,b,...] [--seeds 0,1]

Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from genaf.api import evaluate, finetune
from genaf.data import load_dataset
from genaf.demo import SETTINGS, craft_demo_perturbations
from genaf.encoders import load_encoder
from genaf.methods.genaf import REFERENCE_PRESET
from genaf.utils import resolve_device

FEAT = {"space": "features", "student": "adversarial", "target": "pretrained", "reduction": "mean"}
VARIANTS: dict[str, tuple[str, dict]] = {
    "sft": ("sft", {}),
    "at": ("at", {}),
    "at-nowarmup": ("at", {"warmup_epochs": 0}),
    "reference": ("genaf-stage1", dict(REFERENCE_PRESET)),
    "logits-mean-l1": (
        "genaf-stage1",
        {
            "space": "logits",
            "student": "clean",
            "target": "adversarial",
            "reduction": "mean",
            "lam": 1.0,
            "detach_target": False,
        },
    ),
    "feat-pre-l10": ("genaf-stage1", {**FEAT, "lam": 10.0}),
    "feat-pre-l100": ("genaf-stage1", {**FEAT, "lam": 100.0}),
    "feat-pre-l1000": ("genaf-stage1", {**FEAT, "lam": 1000.0}),
    "feat-pre-l1e4": ("genaf-stage1", {**FEAT, "lam": 1e4}),
    "feat-pre-l1e5": ("genaf-stage1", {**FEAT, "lam": 1e5}),
    "feat-pre-l1e6": ("genaf-stage1", {**FEAT, "lam": 1e6}),
    "feat-pre-l1e5-nodetach": ("genaf-stage1", {**FEAT, "lam": 1e5, "detach_weights": False}),
    "feat-clean-l1e5": ("genaf-stage1", {**FEAT, "target": "clean", "lam": 1e5}),
    "logits-mean-l1e4": (
        "genaf-stage1",
        {
            "space": "logits",
            "student": "clean",
            "target": "adversarial",
            "reduction": "mean",
            "lam": 1e4,
            "detach_target": False,
        },
    ),
    "at-cleanfwd": ("genaf-stage1", {"lam": 0.0, "clean_forward": True}),
    "feat-clean-l100": ("genaf-stage1", {**FEAT, "target": "clean", "lam": 100.0}),
    "at+stage2": ("genaf", {"lam": 0.0}),
    "at+stage2+evo": ("genaf", {"lam": 0.0, "evolution": True}),
    "genaf": ("genaf", {}),
    "genaf+evo": ("genaf", {"evolution": True}),
}
ORDER = ["ssp-universal", "l4a-base", "uniform-noise", "pgd10-wb"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reeval", action="store_true", help="re-evaluate finished runs with the current perturbations")
    a = ap.parse_args(argv)
    out = Path(a.out)
    s = SETTINGS["full"]
    dev = resolve_device(a.device)
    rows = []
    for seed in [int(x) for x in a.seeds.split(",")]:
        data = load_dataset("fashion-mnist", n_train=s["n_train"], n_val=s["n_val"], n_test=s["n_test"], seed=seed)
        perts = craft_demo_perturbations(
            load_encoder("demo"), data, s, out / f"perturbations-seed{seed}", dev, seed, False, log=lambda *_: None
        )
        for name in a.variants.split(","):
            method, mc = VARIANTS[name]
            run = out / f"{name}-seed{seed}"
            if (
                not (run / "metrics.json").is_file()
                or "ssp-universal" not in json.loads((run / "metrics.json").read_text())["robust_acc"]
            ):
                t0 = time.time()
                cfg = {"epochs": s["epochs"], **mc}
                if method != "sft":
                    cfg.setdefault("attack_steps", s["attack_steps"])
                if method == "genaf":
                    cfg.update(stage2_epochs=s["stage2_epochs"], probe_size=s["probe_size"])
                finetune(
                    "demo",
                    "fashion-mnist",
                    method,
                    run,
                    method_config=cfg,
                    seed=seed,
                    resume=(run / "checkpoint.pt").is_file(),
                    datamodule=data,
                    train={
                        "batch_size": s["batch_size"],
                        "n_val_robust": s["n_val_robust"],
                        "val_steps": s["attack_steps"],
                        "device": str(dev),
                    },
                    data={"n_train": s["n_train"], "n_val": s["n_val"], "n_test": s["n_test"]},
                    log=lambda *_: None,
                )
                evaluate(run, perts, datamodule=data, device=str(dev))
                print(f"{name} seed {seed}: {time.time() - t0:.0f}s", file=sys.stderr)
            elif a.reeval:
                evaluate(run, perts, datamodule=data, device=str(dev))
            m = json.loads((run / "metrics.json").read_text())
            dae = [m["robust_acc"][k] for k in ("ssp-universal", "l4a-base")]
            rows.append(
                {
                    "variant": name,
                    "method": method,
                    "seed": seed,
                    "config": mc,
                    "clean_acc": m["clean_acc"],
                    **{f"ra_{k}": m["robust_acc"].get(k) for k in ORDER},
                    "mean_dae_ra": sum(dae) / len(dae),
                    "weight_drift": m.get("weight_drift"),
                }
            )
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| variant | seed | clean | " + " | ".join(ORDER) + " | mean DAE RA | drift |",
        "|---|---|---|" + "---|" * len(ORDER) + "---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {100 * r['clean_acc']:.1f} | "
            + " | ".join(f"{100 * r[f'ra_{k}']:.1f}" for k in ORDER)
            + f" | {100 * r['mean_dae_ra']:.1f} | {r['weight_drift']:.3f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
