"""``genaf demo``: the offline end-to-end demo on the shipped encoder and Fashion-MNIST.

Protocol (fixed, not tuned to the result):
- encoder: the shipped demo encoder (SimCLR, narrow ResNet-18, Fashion-MNIST);
- downstream: Fashion-MNIST, seeded train / validation / test subsets;
- DAEs: universal L∞ perturbations at ε = 16/255 crafted on the **original** encoder from
  surrogate images (training-split images used by neither train nor validation, and the test
  split is separate), plus uniform noise of the same ε as a control;
- training PGD and the stage-2 probe: ε = 8/255, step 2/255;
- white-box PGD-10 (ε = 8/255) on each fine-tuned model, for completeness;
- methods: ``sft``, ``at`` and ``genaf`` with their defaults, one seed (recorded).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .api import craft, evaluate, finetune
from .data import load_dataset
from .encoders import load_encoder
from .report import demo_table
from .utils import resolve_device, write_json

DAE_EPS = 16 / 255
SETTINGS = {
    "full": {
        "n_train": 3000,
        "n_val": 1000,
        "n_test": 2000,
        "n_surrogate": 2000,
        "epochs": 4,
        "stage2_epochs": 2,
        "attack_steps": 5,
        "batch_size": 128,
        "n_val_robust": 256,
        "probe_size": 256,
    },
    "quick": {
        "n_train": 512,
        "n_val": 256,
        "n_test": 256,
        "n_surrogate": 256,
        "epochs": 1,
        "stage2_epochs": 1,
        "attack_steps": 2,
        "batch_size": 128,
        "n_val_robust": 64,
        "probe_size": 64,
    },
}
ATTACKS = ("l4a-base", "ssp-universal", "uniform-noise")
METHODS = ("sft", "at", "genaf")


def run_demo(out: str | Path = "demo-run", quick: bool = False, device: str = "auto", seed: int = 0, log=print) -> dict:
    t0 = time.time()
    out = Path(out)
    s = SETTINGS["quick" if quick else "full"]
    dev = resolve_device(device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_dataset("fashion-mnist", n_train=s["n_train"], n_val=s["n_val"], n_test=s["n_test"], seed=seed)
    enc = load_encoder("demo")
    sur = data.surrogate(s["n_surrogate"])
    sur_name = f"fashion-mnist training images outside train/val ({len(sur)})"
    log(
        f"demo: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images; "
        f"{len(sur)} disjoint surrogate images; DAE eps = 16/255"
    )
    quality = encoder_quality(enc, data, seed)
    log(
        f"demo encoder on this split: k-NN {100 * quality['knn_acc']:.1f}% (random weights "
        f"{100 * quality['knn_acc_random_init']:.1f}%), linear probe {100 * quality['linear_probe_acc']:.1f}% "
        f"(random weights {100 * quality['linear_probe_acc_random_init']:.1f}%)"
    )
    perts = craft_demo_perturbations(enc, data, s, out / "perturbations", dev, seed, quick, log)
    results = {}
    for method in METHODS:
        run = out / method
        if (run / "metrics.json").is_file() and all(
            a in json.loads((run / "metrics.json").read_text())["robust_acc"] for a in ATTACKS
        ):
            results[method] = json.loads((run / "metrics.json").read_text())
            continue
        log(f"--- {method} ---")
        mc = {"epochs": s["epochs"]}
        if method != "sft":
            mc["attack_steps"] = s["attack_steps"]
        if method == "genaf":
            mc.update(stage2_epochs=s["stage2_epochs"], probe_size=s["probe_size"])
        resume = (run / "checkpoint.pt").is_file()
        finetune(
            "demo",
            "fashion-mnist",
            method,
            run,
            method_config=mc,
            seed=seed,
            resume=resume,
            train={
                "batch_size": s["batch_size"],
                "n_val_robust": s["n_val_robust"],
                "device": str(dev),
                "val_steps": s["attack_steps"],
            },
            data={"n_train": s["n_train"], "n_val": s["n_val"], "n_test": s["n_test"]},
            datamodule=data,
            log=log,
        )
        results[method] = evaluate(run, perts, datamodule=data, device=str(dev))
    order = ["l4a-base", "ssp-universal", "uniform-noise", "pgd10-wb"]
    table = demo_table(results, order)
    seconds = time.time() - t0
    text = [
        "# genaf demo",
        "",
        f"Encoder: the shipped demo encoder (SimCLR, ResNet-18 width 16, Fashion-MNIST). Downstream: Fashion-MNIST, "
        f"{len(data.train)} train / {len(data.val)} validation / {len(data.test)} test images, seed {seed}.",
        f"DAEs: universal L∞ perturbations, ε = 16/255, crafted on the original encoder from {sur_name}; "
        "uniform-noise is the random control of the same ε. pgd10-wb: white-box PGD-10 at ε = 8/255 on each "
        "fine-tuned model (stronger than the threat model).",
        "Training PGD: ε = 8/255, step 2/255. Accuracies in percent; weight drift = ‖θ−θ0‖/‖θ0‖ of the encoder.",
        "",
        f"Encoder quality on this split (test accuracy of a k-NN (k=20) / linear probe on frozen features, "
        f"trained on the {len(data.train)} training images): pre-trained {100 * quality['knn_acc']:.1f} / "
        f"{100 * quality['linear_probe_acc']:.1f}, same architecture with random weights "
        f"{100 * quality['knn_acc_random_init']:.1f} / {100 * quality['linear_probe_acc_random_init']:.1f}.",
        "",
        table,
        "",
        f"Wall time: {seconds:.0f} s{' (quick setting: not the protocol)' if quick else ''}.",
    ]
    (out / "report.md").write_text("\n".join(text) + "\n")
    write_json(
        out / "summary.json",
        {
            "settings": s,
            "dae_eps": DAE_EPS,
            "seed": seed,
            "seconds": round(seconds, 1),
            "encoder_quality": quality,
            "results": {m: {"clean_acc": r["clean_acc"], "robust_acc": r["robust_acc"]} for m, r in results.items()},
        },
    )
    log(table)
    log(f"report: {out / 'report.md'} ({seconds:.0f} s)")
    return results


def craft_demo_perturbations(enc, data, s: dict, folder: Path, dev, seed: int, quick: bool, log=print) -> dict:
    """Craft (or reload) the demo's DAEs on the original encoder from the disjoint surrogate pool."""
    from .attacks import Perturbation
    from .visualize import save_perturbation_images

    sur = data.surrogate(s["n_surrogate"])
    sur_name = f"fashion-mnist training images outside train/val ({len(sur)})"
    perts = {}
    for name in ATTACKS:
        path = folder / f"{name}.safetensors"
        if path.is_file():
            perts[name] = Perturbation.load(path)
            continue
        cfg = {"iterations": 2 * s["n_surrogate"] // 64} if quick and name != "uniform-noise" else {}
        perts[name] = craft(
            enc,
            name,
            sur,
            DAE_EPS,
            preset="cpu",
            seed=seed,
            surrogate_name=sur_name,
            device=str(dev),
            out=path,
            log=log,
            **cfg,
        )
        save_perturbation_images(perts[name], data.test.subset(8), path)
    return perts


def encoder_quality(enc, data, seed: int = 0) -> dict:
    """k-NN and linear-probe test accuracy of the encoder and of random weights, on the demo split."""
    from .encoders.base import Encoder
    from .encoders.resnet import build_backbone
    from .pretrain import knn_accuracy, linear_probe_accuracy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rand = Encoder(build_backbone(enc.meta), dict(enc.meta)).eval()
    out = {}
    for key, e in (("", enc), ("_random_init", rand)):
        out[f"knn_acc{key}"] = knn_accuracy(e, data.train, data.test)
        out[f"linear_probe_acc{key}"] = linear_probe_accuracy(e, data.train, data.test, epochs=20, seed=seed)
    return out
