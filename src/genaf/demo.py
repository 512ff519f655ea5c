"""``genaf demo``: the offline end-to-end demo on the shipped encoder and Fashion-MNIST.

Protocol (fixed, not tuned to the result):
- encoder: a shipped encoder pre-trained with SimCLR on Fashion-MNIST: ``demo`` (narrow ResNet-18,
  the default) or ``demo-vit`` (genaf's vit-tiny, 7 × 7 patches of 4 px);
- downstream: ``fashion-mnist-demo`` (8,000 Fashion-MNIST images shipped with the package,
  :mod:`genaf.data.demo_subset`), seeded train / validation splits, a fixed test split;
- DAEs: universal L∞ perturbations at ε = 16/255 crafted on the **original** encoder from the
  dataset's surrogate reserve (2,000 training images that no train or validation split uses;
  the test split is separate), plus uniform noise of the same ε as a control;
- training PGD and the stage-2 probe: ε = 8/255, step 2/255;
- white-box PGD-10 (ε = 8/255) on each fine-tuned model, for completeness;
- methods: ``sft``, ``at`` and ``genaf`` with their defaults, and ``sft-budget`` / ``at-budget``
  (SFT and AT trained for Gen-AF's total epochs, a control for a gain that is only more
  training); one seed (recorded).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .api import craft, evaluate, finetune
from .data import load_dataset
from .encoders import load_encoder
from .report import demo_table
from .train import LAST_EPOCH
from .utils import resolve_device, write_json

DAE_EPS = 16 / 255
# The demo's data: a fixed 8,000-image subset of Fashion-MNIST shipped with the package (read from
# the original files when they are installed; genaf.data.demo_subset), so a fresh install runs it.
DATASET = "fashion-mnist-demo"
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
    "quick": {  # a smoke test of the whole pipeline (the test suite runs it), not the protocol
        "n_train": 512,
        "n_val": 256,
        "n_test": 64,
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
# SFT and AT again at Gen-AF's total budget (head warm-up + stage 1 + stage 2 epochs), so that a
# gain that is only more training shows. Each continues its shorter run from that run's last
# epoch (finetune(continue_from=...)), which computes what a run from scratch computes
# (tests/methods/test_continue.py) and saves the epochs the two share.
CONTROLS = ("sft-budget", "at-budget")
CONTINUES = {"sft-budget": "sft", "at-budget": "at"}
# The encoders the demo can defend, as the report names them.
ENCODERS = {
    "demo": "the shipped demo encoder (SimCLR, ResNet-18 width 16, Fashion-MNIST)",
    "demo-vit": "the shipped demo ViT (SimCLR, vit-tiny: 4 blocks, width 96, 4 px patches, Fashion-MNIST)",
}


def default_out(encoder: str = "demo") -> str:
    """The demo's default output folder for ``encoder`` (one per encoder, so runs never mix)."""
    return "demo-run" if encoder == "demo" else f"demo-run-{encoder.removeprefix('demo-')}"


def genaf_epochs(s: dict) -> int:
    """Gen-AF's total epochs in a demo setting: the head warm-up (1) + stage 1 + stage 2."""
    from .methods.genaf import GENAF_DEFAULTS

    return int(GENAF_DEFAULTS["warmup_epochs"]) + s["epochs"] + s["stage2_epochs"]


def method_plan(s: dict) -> dict[str, tuple[str, dict]]:
    """Run label -> (method, options) of the demo, controls included."""
    from .methods.genaf import STAGE1_DEFAULTS

    total = genaf_epochs(s)
    plan = {
        "sft": ("sft", {"epochs": s["epochs"]}),
        "at": ("at", {"epochs": s["epochs"], "attack_steps": s["attack_steps"]}),
        "genaf": (
            "genaf",
            {
                "epochs": s["epochs"],
                "attack_steps": s["attack_steps"],
                "stage2_epochs": s["stage2_epochs"],
                "probe_size": s["probe_size"],
            },
        ),
        "sft-budget": ("sft", {"epochs": total}),
        "at-budget": (
            "at",
            {"epochs": total - int(STAGE1_DEFAULTS["warmup_epochs"]), "attack_steps": s["attack_steps"]},
        ),
    }
    return plan


def run_demo(
    out: str | Path = "demo-run",
    quick: bool = False,
    device: str = "auto",
    seed: int = 0,
    log=print,
    deterministic: bool = False,
    encoder: str = "demo",
) -> dict:
    if encoder not in ENCODERS:
        from .errors import SpecError

        raise SpecError(f"the demo runs on {' or '.join(ENCODERS)}, not {encoder!r}; use genaf finetune for others")
    t0 = time.time()
    out = Path(out)
    s = SETTINGS["quick" if quick else "full"]
    dev = resolve_device(device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_dataset(DATASET, n_train=s["n_train"], n_val=s["n_val"], n_test=s["n_test"], seed=seed)
    log(f"demo: data read from {data.info['source']}")
    enc = load_encoder(encoder)
    sur = data.surrogate(s["n_surrogate"])
    sur_name = f"the {DATASET} surrogate reserve ({len(sur)} training images in no downstream split)"
    log(
        f"demo: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images; "
        f"{len(sur)} disjoint surrogate images; DAE eps = 16/255"
    )
    quality = encoder_quality(enc, data, seed)
    log(
        f"{encoder} encoder on this split: k-NN {100 * quality['knn_acc']:.1f}% (random weights "
        f"{100 * quality['knn_acc_random_init']:.1f}%), linear probe {100 * quality['linear_probe_acc']:.1f}% "
        f"(random weights {100 * quality['linear_probe_acc_random_init']:.1f}%)"
    )
    perts = craft_demo_perturbations(enc, data, s, out / "perturbations", dev, seed, quick, log)
    results = {}
    for label, (method, mc) in method_plan(s).items():
        run = out / label
        check_run_folder(run, method, mc, seed, encoder)
        log(f"--- {label} ({method}, {mc}) ---")
        if not (run / "metrics.json").is_file():
            resume = (run / "checkpoint.pt").is_file()
            source = out / CONTINUES[label] if label in CONTINUES else None
            if source is not None and not resume and not (source / LAST_EPOCH).is_file():
                log(f"{label}: {source} kept no last epoch to continue from (an older demo); training from scratch")
                source = None
            if source is not None and not resume:
                log(f"{label}: continuing {CONTINUES[label]}'s run from its last epoch ({source / LAST_EPOCH})")
            finetune(
                encoder,
                DATASET,
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
                    "deterministic": deterministic,
                    "keep_last_epoch": label in CONTINUES.values(),
                },
                data={"n_train": s["n_train"], "n_val": s["n_val"], "n_test": s["n_test"]},
                datamodule=data,
                log=log,
                continue_from=source if not resume else None,
            )
        results[label] = evaluate(run, perts, datamodule=data, device=str(dev), log=log)
    order = ["l4a-base", "ssp-universal", "uniform-noise", "pgd10-wb"]
    table = demo_table(results, order)
    figures = demo_figures(out, perts, data, seed, encoder)
    seconds = time.time() - t0
    text = [
        "# genaf demo",
        "",
        f"Encoder: {ENCODERS[encoder]}. "
        f"Downstream: {DATASET} (read from {data.info['source']}), "
        f"{len(data.train)} train / {len(data.val)} validation / {len(data.test)} test images, seed {seed}.",
        f"DAEs: universal L∞ perturbations, ε = 16/255, crafted on the original encoder from {sur_name}; "
        "uniform-noise is the random control of the same ε. pgd10-wb: white-box PGD-10 at ε = 8/255 on each "
        "fine-tuned model (stronger than the threat model).",
        "Training PGD: ε = 8/255, step 2/255. Accuracies in percent; weight drift = ‖θ−θ0‖/‖θ0‖ of the encoder.",
        f"Budget: `sft-budget` and `at-budget` are SFT and AT trained for Gen-AF's total {genaf_epochs(s)} epochs "
        "(head warm-up + stage 1 + stage 2), a control for a gain that is only more training (each continues the "
        "`sft` or `at` run from its last epoch, which computes what a run from scratch does); `epochs` and "
        "`passes/img` (encoder forward or forward+backward passes per training image, attack steps included) "
        "give each run's training budget.",
        "",
        f"Encoder quality on this split (test accuracy of a k-NN (k=20) / linear probe on frozen features, "
        f"trained on the {len(data.train)} training images): pre-trained {100 * quality['knn_acc']:.1f} / "
        f"{100 * quality['linear_probe_acc']:.1f}, same architecture with random weights "
        f"{100 * quality['knn_acc_random_init']:.1f} / {100 * quality['linear_probe_acc_random_init']:.1f}.",
        "",
        table,
        "",
        f"Wall time: {seconds:.0f} s{' (quick setting: not the protocol)' if quick else ''}.",
        "",
        *figures,
    ]
    (out / "report.md").write_text("\n".join(text) + "\n")
    write_json(
        out / "summary.json",
        {
            "settings": s,
            "encoder": encoder,
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


def check_run_folder(run: Path, method: str, mc: dict, seed: int, encoder: str) -> None:
    """Refuse a demo run folder that holds a run made with other settings (another encoder,
    method, seed or option), so a demo never reports a result it did not make."""
    if not (run / "config.yaml").is_file():
        return
    import yaml

    old = yaml.safe_load((run / "config.yaml").read_text()) or {}
    recorded = {"method": old.get("method"), "seed": old.get("seed"), "encoder": old.get("encoder")}
    recorded.update({k: (old.get("method_config") or {}).get(k) for k in mc})
    if recorded != {"method": method, "seed": seed, "encoder": encoder, **mc}:
        from .errors import ConfigError

        raise ConfigError(
            f"{run} holds a run made with other settings ({old.get('method')} on {old.get('encoder')}, "
            f"seed {old.get('seed')}); choose another --out for this demo or delete that folder"
        )


def craft_demo_perturbations(enc, data, s: dict, folder: Path, dev, seed: int, quick: bool, log=print) -> dict:
    """Craft (or reload) the demo's DAEs on the original encoder from the disjoint surrogate pool."""
    from .api import stale_reasons
    from .attacks import Perturbation

    sur = data.surrogate(s["n_surrogate"])
    sur_name = f"{DATASET} surrogate reserve ({len(sur)} images, in no downstream split)"
    perts = {}
    for name in ATTACKS:
        path = folder / f"{name}.safetensors"
        cfg = {"iterations": 2 * s["n_surrogate"] // 64} if quick and name != "uniform-noise" else {}
        if path.is_file():
            cached = Perturbation.load(path)
            why = stale_reasons(
                cached, attack=name, eps=DAE_EPS, seed=seed, preset="cpu", options=cfg, encoder=enc, surrogate=sur
            )
            if not why:
                perts[name] = cached
                continue
            log(f"demo: {path} was made with other settings ({'; '.join(why)}): crafting it again")
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
    return perts


def demo_figures(out: Path, perts: dict, data, seed: int, encoder: str = "demo") -> list[str]:
    """Draw the demo's pictures and return the report lines that show them: each DAE on the first
    test images with the fine-tuned ``sft`` model's predictions, δ itself, and the robust
    sensitivity of every layer in Gen-AF's stage 2 (:mod:`genaf.visualize`, :mod:`genaf.bench_report`)."""
    import json

    from .bench_report import plot_sensitivity
    from .models import load_model
    from .visualize import save_perturbation_images

    model = load_model(out / "sft")
    lines = [
        "## Pictures",
        "",
        "Each perturbation on the first 8 test images: clean, perturbed (clamped to [0, 1]) and "
        "δ = perturbed − clean (mean of the colour channels; diverging colour scale in units of 1/255), with the "
        "predictions of the fine-tuned `sft` model under each image, in red where the perturbation changed one. "
        "Then δ itself, one panel per colour channel.",
        "",
    ]
    for name, pert in perts.items():
        path = out / "perturbations" / f"{name}.safetensors"
        save_perturbation_images(
            pert, data.test.subset(8), path, model=model, class_names=data.classes, model_name="sft", encoder=encoder
        )
        lines += [
            f"### {name}",
            "",
            f"![{name}: clean / perturbed / δ with sft's predictions](perturbations/{name}.examples.png)",
            f"![δ of {name}](perturbations/{name}.delta.png)",
            "",
        ]
    sens = out / "genaf" / "sensitivity.json"
    if sens.is_file():
        plot_sensitivity(
            {seed: json.loads(sens.read_text())},
            f"Robust sensitivity of each layer: genaf, {encoder} → {DATASET}, seed {seed}",
            out / "genaf" / "sensitivity.png",
        )
        lines += [
            "### Gen-AF's stage 2: the layers it fine-tunes",
            "",
            "The robust sensitivity of every layer of the stage-1 model; the selected (filled, red) layers, the "
            "least sensitive, are the only ones stage 2 trains.",
            "",
            "![robust sensitivity of every layer, genaf](genaf/sensitivity.png)",
            "",
        ]
    return lines


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
