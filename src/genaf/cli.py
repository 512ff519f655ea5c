"""The ``genaf`` command: a thin layer over ``genaf.api``.

This is the only place where errors become a one-line message and exit code 2
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import GenafError


def _quiet_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bars or progress lines and no step-by-step log; warnings, errors and the result still "
        "show (default: progress shown, a bar on a terminal, plain lines in a log or pipe)",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")


def _common(p: argparse.ArgumentParser, seed: str = "0") -> None:
    p.add_argument(
        "--device", default=None, help="auto, cpu or cuda (default auto: cuda when a GPU is visible, else cpu)"
    )
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default {seed})")
    _quiet_debug(p)
    _limit_arg(p)


def _limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="raise a resource limit for files you trust (repeatable); names: see genaf.limits.LIMITS "
        "(default: the built-in limits, or $GENAF_LIMIT_<NAME>)",
    )


def _dataset_choices() -> str:
    from .data import DATASETS

    return ", ".join([*DATASETS, "imagefolder:PATH"])


def _encoder_choices() -> str:
    from .encoders import SCHEMES

    forms = {"solo": "solo:PATH", "torchvision": "torchvision:ARCH:PATH", "file": "file:PATH", "demo": "demo",
             "demo-vit": "demo-vit", "demo-vit-mix": "demo-vit-mix", "random": "random:demo",
             "timm": "timm:NAME[:PATH]", "hf": "hf:NAME"}
    return ", ".join(forms.get(s, f"{s}:...") for s in SCHEMES)


def _method_choices() -> str:
    from .methods.base import method_names

    return ", ".join(method_names())


def _attack_choices(kind: str | None = None) -> str:
    """The registered attacks; ``kind``: 'universal' (they craft a perturbation file) or
    'per-sample' (crafted per image at evaluation)."""
    from .attacks.base import _ATTACKS, attack_names

    names = attack_names()
    if kind == "universal":
        names = [n for n in names if hasattr(_ATTACKS[n], "fit")]
    elif kind == "per-sample":
        names = [n for n in names if not hasattr(_ATTACKS[n], "fit")]
    return ", ".join(names)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default=None,
        help=f"downstream dataset: {_dataset_choices()} (default fashion-mnist, or the --config file's)",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding the dataset's files (default: the dataset's usual place, e.g. "
        "/usr/share/datasets/fashion-mnist or $GENAF_FASHION_MNIST; a root without the files is an error)",
    )
    p.add_argument(
        "--download", action="store_true", default=None, help="download the dataset if it is missing (default: no)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="resize images to this square side (default: native size)"
    )
    p.add_argument(
        "--n-train", type=int, default=None, help="training images (default: all left after reserve and validation)"
    )
    p.add_argument(
        "--n-val", type=int, default=None, help="validation images (default 10%% of the training images left)"
    )
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the whole test split)")
    _reserve_arg(p)


def _reserve_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--surrogate-reserve",
        type=int,
        default=None,
        help="training images kept out of every downstream split for the attacker's surrogates "
        "(default 10%% of the training split, at most 5000; give genaf finetune and genaf attack the same value)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="genaf",
        description="Secure fine-tuning of pre-trained encoders against "
        "downstream-agnostic adversarial examples (Gen-AF and baselines).",
    )
    from . import __version__

    ap.add_argument("--version", action="version", version=f"genaf {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "demo",
        help="the offline demo: SFT, AT and Gen-AF on Fashion-MNIST against DAEs",
        description="The offline demo: SFT, AT and Gen-AF on Fashion-MNIST against DAEs crafted on the "
        "shipped encoder; writes OUT/report.md and OUT/<method>/metrics.json "
        "(about 20 minutes of CPU time at one thread).",
    )
    p.add_argument(
        "--encoder",
        default="demo",
        choices=["demo", "demo-vit"],
        help="the shipped encoder to defend: demo (SimCLR ResNet-18, width 16) or demo-vit (SimCLR vit-tiny) "
        "(default %(default)s)",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default demo-run, or demo-run-vit with --encoder demo-vit)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a much smaller setting, a few minutes (smoke test, not the protocol) "
        "(default: the full demo)"
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels for every fine-tune (see genaf finetune --deterministic; default off)",
    )
    _common(p)

    p = sub.add_parser(
        "finetune",
        help="fine-tune an encoder on a downstream dataset",
        description="Fine-tune an encoder on a downstream dataset with a method; writes OUT/model.safetensors, "
        "config.yaml, history.json and metrics.json. Options come from flags, --config YAML and --set.",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help=f"encoder spec: {_encoder_choices()}; options after '?', e.g. timm:NAME:PATH?pool=mean "
        "(docs/ENCODERS.md) (default demo, or the --config file's)",
    )
    p.add_argument(
        "--method",
        default=None,
        help=f"fine-tuning method: {_method_choices()} (default genaf, or the --config file's)",
    )
    p.add_argument("--out", required=True, help="run directory to create (required)")
    p.add_argument("--config", default=None, help="YAML file with any of the options (default: none)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the method's stage(s) (default: the method's)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch size; under torchrun the global batch, split evenly across the processes (default 128)",
    )
    p.add_argument("--eps", default=None, help="training PGD budget, e.g. 8/255 (default: the method's, 8/255)")
    p.add_argument(
        "--lam",
        type=float,
        default=None,
        help="genetic regulariser weight (genaf only; default 0, the regulariser off: docs/GENAF.md has the "
        "verdict; 1e4 was the default until 2026-12-07)",
    )
    p.add_argument(
        "--attack-steps",
        type=int,
        default=None,
        help="training PGD steps K; 1 = fast mode (FGSM with random start, step 1.25 eps, overfitting guard) "
        "(default: the method's)",
    )
    p.add_argument(
        "--head", default=None, choices=["mlp", "linear"], help="downstream head: mlp or linear (default mlp)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="KEY=VALUE",
        help="any method option, repeatable, e.g. --set lam=1e5 (default: the method's values)",
    )
    p.add_argument(
        "--amp", default=None, choices=["none", "bf16"], help="autocast: none or bf16 (default none; GPU users)"
    )
    p.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last memory layout (default: off)"
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, "
        "CUBLAS_WORKSPACE_CONFIG): a CUDA run of one seed repeats exactly, somewhat slower; "
        "recorded in metrics.json (default off)",
    )
    p.add_argument(
        "--compile",
        default=None,
        choices=["none", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile the model (GPU users; one graph per train/eval mode) (default none)",
    )
    p.add_argument(
        "--logger",
        default=None,
        choices=["none", "csv", "tensorboard"],
        help="training curves beside history.json: csv appends one row per epoch to OUT/history.csv as it goes; "
        "tensorboard writes OUT/tensorboard/ (needs pip install tensorboard) (default none)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out from its checkpoint, with the saved options (default: a new run)",
    )
    p.add_argument(
        "--dist-backend",
        default=None,
        choices=["auto", "nccl", "gloo"],
        help="under torchrun: the process-group backend; auto is nccl on GPUs, gloo on CPUs "
        "(docs/DISTRIBUTED.md) (default auto)",
    )
    p.add_argument(
        "--ddp-batchnorm",
        default=None,
        choices=["global", "rank"],
        help="under torchrun: BatchNorm in train mode normalises with the global batch's statistics (global: "
        "what one process computes) or each process's own (rank: no communication in the forward) "
        "(default global)",
    )
    _data_args(p)
    _common(p, seed="0, or the --config file's")

    p = sub.add_parser(
        "attack",
        help="craft a universal DAE on an encoder from surrogate images",
        description="Craft a universal downstream-agnostic perturbation on an encoder from the surrogate "
        "reserve of a dataset; writes a .safetensors perturbation file and two PNGs beside it. Under torchrun "
        "(torchrun --nproc_per_node=N -m genaf attack ...) the processes share every surrogate batch and take "
        "the single-process steps; uap, fff and uniform-noise run whole on every process; rank 0 writes "
        "(docs/DISTRIBUTED.md).",
    )
    p.add_argument("--encoder", default="demo", help=f"encoder spec: {_encoder_choices()} (default %(default)s)")
    p.add_argument(
        "--attack", required=True, help=f"universal attack (required): {_attack_choices('universal')}"
    )
    p.add_argument(
        "--surrogate",
        default="fashion-mnist",
        help="dataset whose surrogate reserve is used: training images that no train/val split of any "
        "genaf finetune on that dataset uses, for any seed (the test split is separate); "
        f"one of {_dataset_choices()} (default %(default)s)",
    )
    p.add_argument(
        "--n-surrogate",
        type=int,
        default=2000,
        help="surrogate images used (exactly this many, or an error); default 2000",
    )
    p.add_argument("--eps", required=True, help="L-inf budget in [0,1] pixel units, e.g. 16/255 (required)")
    p.add_argument(
        "--preset", default="cpu", help="attack settings: cpu (small, fast) or paper (default %(default)s)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="KEY=VALUE",
        help="any attack option, repeatable, e.g. --set iterations=200 (default: the preset's values)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="perturbation file to write (required); a safetensors file: a name not ending in .safetensors "
        "gets that suffix (ssp.pt -> ssp.safetensors), and the name written is printed",
    )
    p.add_argument(
        "--data-root", default=None, help="where the surrogate dataset's files live (default: its usual place)"
    )
    p.add_argument(
        "--download", action="store_true", default=None, help="download the dataset if it is missing (default: no)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="resize images to this square side (default: native size)"
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="as genaf finetune (checked; the reserve does not move) (default: all left, as there)",
    )
    p.add_argument(
        "--n-val",
        type=int,
        default=None,
        help="as genaf finetune (checked; the reserve does not move) (default 10%%, as there)",
    )
    p.add_argument(
        "--dist-backend",
        default="auto",
        choices=["auto", "nccl", "gloo"],
        help="under torchrun: the process-group backend; auto is nccl on GPUs, gloo on CPUs "
        "(docs/DISTRIBUTED.md) (default %(default)s)",
    )
    _reserve_arg(p)
    _common(p)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a run against universal perturbation files and per-sample DAEs (adds to metrics.json)",
    )
    p.add_argument("--model", required=True, help="run directory of genaf finetune (required)")
    p.add_argument(
        "--dataset",
        default=None,
        help="another dataset than the run's own (default: the run's); its results need --out FILE",
    )
    p.add_argument(
        "--perturbation",
        nargs="*",
        default=[],
        metavar="FILE",
        help="universal perturbation files made by genaf attack (default: none)",
    )
    p.add_argument(
        "--attack",
        nargs="*",
        default=[],
        metavar="NAME",
        help=f"per-sample DAEs, crafted for every evaluated image on the run's original encoder: "
        f"{_attack_choices('per-sample')} (default: none)",
    )
    p.add_argument(
        "--preset", default="cpu", help="preset of the per-sample attacks: cpu or paper (default %(default)s)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="KEY=VALUE",
        help="options of the per-sample attacks, repeatable (default: the preset's values)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="evaluate on the test split (default; metrics.json) or the validation split (its 'validation' section)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the results to this JSON file instead of the run's metrics.json (another dataset, "
        "a read-only run directory) (default: the run's metrics.json)",
    )
    p.add_argument(
        "--whitebox",
        action="store_true",
        help="also run white-box FGSM and PGD-10 at 8/255 on the model (default: off; the run's eval settings)",
    )
    p.add_argument(
        "--autoattack",
        nargs="?",
        const="standard",
        default=None,
        choices=["standard", "apgd"],
        help="also run AutoAttack (slow): its standard version (APGD-CE, APGD-T, FAB-T, Square; what a bare "
        "--autoattack runs) or apgd (APGD-CE + APGD-T only) (default: off)",
    )
    p.add_argument(
        "--resize",
        default=None,
        choices=["none", "bilinear"],
        help="perturbations of another resolution than the images: refuse (none) or resize (bilinear) "
        "(default: refuse)",
    )
    _common(p, seed="the run's own seed; another value is refused")

    p = sub.add_parser(
        "assess",
        help="how exposed is a task to DAEs, and is a defence worth it: cheap SFT, the DAE suite, a recommendation",
        description="Fine-tune ENCODER on DATASET with SFT (cheaply), craft the universal DAE suite (l4a-base, "
        "ssp-universal; uniform noise as the control) on the original encoder from surrogate data, report the "
        "exposure (robust accuracy under each DAE, the worst case, the noise control) and recommend no defence, "
        "Gen-AF or an AT-family method from measured regimes, with the expected clean-accuracy cost and the "
        "estimated time of the defence; writes OUT/assess.json, OUT/assess.md and OUT/assess.png (docs/ASSESS.md).",
    )
    p.add_argument("encoder", help=f"encoder spec, as genaf finetune --encoder takes it: {_encoder_choices()}")
    p.add_argument("dataset", help=f"the task's dataset, as genaf finetune --dataset takes it: {_dataset_choices()}")
    p.add_argument(
        "--surrogate",
        default=None,
        help="dataset whose surrogate reserve the attacker crafts from (its training images in no split of any "
        f"genaf finetune on it), read from its usual place: {_dataset_choices()} (default: a public dataset other "
        "than the task: rendered-digits for a Fashion-MNIST task, else fashion-mnist-demo)",
    )
    p.add_argument(
        "--same-domain",
        action="store_true",
        help="also craft the suite from the task's own surrogate reserve (disjoint from its splits, as genaf attack "
        "does), reported as the worst case if the attacker holds data of your domain (default: off)",
    )
    p.add_argument(
        "--n-surrogate",
        type=int,
        default=None,
        help="surrogate images per surrogate dataset (exactly this many, or an error) "
        "(default: 1000, 64 with --quick, or all the reserve holds when it holds fewer)",
    )
    p.add_argument("--eps", default="16/255", help="L-inf budget of the DAEs, e.g. 16/255 (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="SFT epochs (default 2, 1 with --quick)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="training batch size, also of the cost estimate (default 128)"
    )
    p.add_argument(
        "--regimes",
        default=None,
        help="a regimes file of measured results to recommend from (JSON, fields in docs/ASSESS.md) "
        "(default: the shipped genaf/assets/regimes.json)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (256 train / 100 val / 128 test images, 64 surrogates, 4 crafting iterations, 1 epoch): a "
        "smoke test in seconds, not a measurement (default: off)",
    )
    p.add_argument("--out", default="assess-run", help="output folder, new or empty (default %(default)s)")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding the task dataset's files (default: the dataset's usual place; a root without the "
        "files is an error)",
    )
    p.add_argument(
        "--download", action="store_true", default=None, help="download the datasets if missing (default: no)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize the task's images to this square side; the surrogate images get the task's size "
        "(default: native size)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="SFT training images (default: all left after reserve and validation, at most 3000; 256 with --quick)",
    )
    p.add_argument(
        "--n-val",
        type=int,
        default=None,
        help="validation images (default 10%% of the training images left, at most 1000; 100 with --quick)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="test images the exposure is measured on (default: the test split, at most 2000; 128 with --quick)",
    )
    _reserve_arg(p)
    _common(p)

    p = sub.add_parser("pretrain", help="self-supervised pre-training of a small encoder (SimCLR or BYOL)")
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help=f"dataset: {_dataset_choices()}, or a mix of several joined by + (e.g. fashion-mnist+rendered-digits: "
        "an equal share of --n-images from each, normalised with the mix's own statistics, probed on each "
        "one's test split) (default %(default)s)",
    )
    p.add_argument(
        "--method", default="simclr", choices=["simclr", "byol"], help="simclr or byol (default %(default)s)"
    )
    p.add_argument("--width", type=int, default=16, help="ResNet base width (default %(default)s; 64 is standard)")
    p.add_argument(
        "--arch",
        default="resnet18",
        help="backbone architecture: resnet18, resnet34, resnet50 or a genaf ViT (vit-tiny, vit-small) "
        "(default %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=12, help="pre-training epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, cosine schedule (default %(default)s)")
    p.add_argument("--n-images", type=int, default=15000, help="training images used (default %(default)s)")
    p.add_argument(
        "--n-test", type=int, default=None, help="test images the k-NN / linear probes score (default: all)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="resize images to this square side (default: native size)"
    )
    p.add_argument("--data-root", default=None, help="folder holding the dataset's files (default: its usual place)")
    p.add_argument("--out", required=True, help="encoder file to write, .safetensors or .pt (required)")
    _common(p)

    p = sub.add_parser("bench", help="run (or resume) an experiment matrix from a YAML file; writes a report")
    p.add_argument("config", help="bench YAML file (schema in genaf.bench; examples in configs/)")
    p.add_argument(
        "--out", required=True, help="output folder (results.csv/json, report.md, runs, perturbations) (required)"
    )
    p.add_argument(
        "--device", default=None, help="overrides the config's device: auto, cpu or cuda (default: the config's)"
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only share I of N (0 <= I < N) of the units, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; "
        "shards write OUT/shards/I-of-N.json and the last to finish (or genaf report OUT) merges them "
        "(default: the whole matrix)",
    )
    p.add_argument(
        "--update-lock",
        action="store_true",
        help="accept encoder files whose sha256 differs from OUT/encoders.lock.json and rewrite the lock; "
        "the runs and perturbations made from the old files are then made again "
        "(default: a changed file is refused)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the units as Ray tasks (needs pip install 'genaf[ray]'): shared perturbations first, then one "
        "task per unit with its CPUs and GPU; no ADDRESS (or 'local'): start a local Ray instance; an ADDRESS "
        "(auto, HOST:PORT, ray://HOST:PORT): a running cluster whose nodes have genaf and see --out at the same "
        "path; not with --shard (default: no Ray, this process runs every unit)",
    )
    p.add_argument(
        "--ray-cpus-per-task",
        type=int,
        default=None,
        metavar="N",
        help="CPUs (and torch threads) each Ray task asks for; a CUDA bench's tasks also ask for 1 GPU (default: 1)",
    )
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        metavar="N",
        help="CPUs of the local Ray instance, i.e. how many CPU tasks run at once (default: this machine's cores)",
    )
    _quiet_debug(p)
    _limit_arg(p)

    p = sub.add_parser("report", help="rebuild report.md and its plots from a bench folder's results.json")
    p.add_argument("dir", help="bench output folder")
    _quiet_debug(p)
    _limit_arg(p)

    p = sub.add_parser(
        "export",
        help="write a run's fine-tuned encoder as a torchvision, timm or genaf weights file",
        description="Write the fine-tuned encoder of a genaf finetune run as a plain weights file: a torchvision "
        "ResNet state dict, a timm state dict or a genaf encoder file; then load it back with the printed "
        "encoder spec and compare its features with the run's. The head (genaf's own MLP) is not exported.",
    )
    p.add_argument("run", help="run directory of genaf finetune (required)")
    p.add_argument(
        "--format",
        required=True,
        choices=["torchvision", "timm", "safetensors"],
        help="torchvision: torchvision ResNet keys without fc (a ResNet-18/34/50 with torchvision's 7x7 stem, "
        "width 64, ImageNet normalisation; loads with torchvision:ARCH:OUT); timm: the timm model's own keys "
        "(timm runs, and such ResNets; loads with timm:NAME:OUT); safetensors: genaf's encoder file with its "
        "metadata (any encoder; loads with file:OUT). A format that does not fit the encoder is refused (required)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="file to write (required): .safetensors (a safetensors file), or .pth/.pt (torchvision/timm: "
        "torch.save of a plain tensor dict; safetensors: genaf's .pt container)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the file back and comparing its features with the run's encoder "
        "(default: compare, and remove the file if they differ)",
    )
    _quiet_debug(p)
    _limit_arg(p)

    p = sub.add_parser("inspect", help="print what an encoder spec loads")
    p.add_argument("spec", help=f"encoder spec: {_encoder_choices()}")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    _quiet_debug(p)
    _limit_arg(p)

    p = sub.add_parser("encoders", help="list known public encoders: source, spec and published sha256")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list (default: a list)")
    _quiet_debug(p)
    return ap


def _log(a):
    """Where a command's step-by-step log goes: stdout, or nowhere with --quiet."""
    return None if getattr(a, "quiet", False) else print


def _silent(msg: str) -> None:
    pass


WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".pkl", ".tar")


def check_encoder_spec(spec: str | None) -> None:
    """A bare weight-file path given as an encoder spec: a one-line error naming the schemes that
    read such a file (the spec says how to read it; genaf never guesses)."""
    from .encoders import SCHEMES
    from .errors import SpecError

    if not spec or spec.partition(":")[0] in SCHEMES:
        return
    suffix = Path(spec).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES and not Path(spec).is_file():
        return
    ways = {
        "solo": f"solo:{spec} (a solo-learn checkpoint)",
        "torchvision": f"torchvision:ARCH:{spec} (a torchvision state dict, e.g. torchvision:resnet50:{spec})",
        "file": f"file:{spec} (a genaf encoder file)",
        "timm": f"timm:NAME:{spec} (timm weights, e.g. timm:vit_small_patch16_224:{spec})",
    }
    order = {".ckpt": ["solo", "file", "torchvision", "timm"], ".safetensors": ["file", "timm", "torchvision", "solo"]}
    names = [n for n in order.get(suffix, ["torchvision", "solo", "file", "timm"]) if n in SCHEMES or n == "file"]
    raise SpecError(
        f"'{spec}' is a bare path; an encoder spec says how to read it: "
        + ", or ".join(ways[n] for n in names if n in ways)
        + " (genaf inspect SPEC shows what it loads)"
    )


def _eps(v):
    from .utils import check_eps, parse_fraction

    return None if v is None else check_eps(parse_fraction(v))


def cmd_finetune(a) -> int:
    from . import api
    from .config import load_yaml, parse_assignments

    file_cfg = load_yaml(a.config) if a.config else None
    mc = parse_assignments(a.sets)
    for k, v in (("epochs", a.epochs), ("lam", a.lam), ("eps", _eps(a.eps)), ("attack_steps", a.attack_steps)):
        if v is not None:
            mc[k] = v
    if file_cfg and "method_config" in file_cfg:
        mc = {**file_cfg["method_config"], **mc}
    train = {
        "batch_size": a.batch_size,
        "device": a.device,
        "amp": a.amp,
        "channels_last": a.channels_last,
        "compile": a.compile,
        "deterministic": a.deterministic,
        "logger": a.logger,
        "dist_backend": a.dist_backend,
        "ddp_batchnorm": a.ddp_batchnorm,
    }
    data = {
        "root": a.data_root,
        "image_size": a.image_size,
        "n_train": a.n_train,
        "n_val": a.n_val,
        "n_test": a.n_test,
        "download": a.download,
        "surrogate_reserve": a.surrogate_reserve,
    }
    from .config import resolve

    cfg = resolve(file_cfg, encoder=a.encoder, dataset=a.dataset, method=a.method, seed=a.seed, head=a.head)
    given = {k for k in ("encoder", "dataset", "method") if getattr(a, k) is not None or k in (file_cfg or {})}
    defaulted = [f"--{k} {cfg[k]}" for k in ("encoder", "dataset", "method") if k not in given]
    from .distributed import main_process

    main = main_process()  # under torchrun rank 0 speaks for every process
    if defaulted and main:  # stated, never silent: a forgotten --dataset is not a quiet Fashion-MNIST run
        print(f"genaf finetune: not given, so the defaults: {' '.join(defaulted)}")  # stdout: stderr is for errors
    m = api.finetune(
        cfg["encoder"],
        cfg["dataset"],
        cfg["method"],
        a.out,
        config=cfg,
        method_config=mc,
        train=train,
        data=data,
        seed=cfg["seed"],
        resume=a.resume,
        log=_log(a) or _silent,
    )
    if main:
        print(_summary(m))
    return 0


def _warn_checks(m: dict) -> None:
    """A failed self-check of the evaluation (genaf.checks) is a loud warning, not a footnote."""
    checks = m.get("checks") or {}
    for name in checks.get("failed", []):
        print(
            f"genaf: WARNING: evaluation check '{name}' FAILED: {checks[name].get('detail', '')} "
            "-- do not trust these robustness numbers before finding out why",
            file=sys.stderr,
        )


def _summary(m: dict) -> str:
    _warn_checks(m)
    ra = ", ".join(f"{k} {100 * v:.1f}%" for k, v in m.get("robust_acc", {}).items())
    where = m.get("evaluated_on") or {}
    split = {"val": "validation"}.get(where.get("split"), where.get("split") or "test")
    ds = f" of {where['dataset']}" if where.get("dataset") else ""
    return f"clean accuracy {100 * m['clean_acc']:.1f}% on {m['n_test']} {split} images{ds}; robust accuracy: {ra}"


def cmd_attack(a) -> int:
    from . import api
    from .config import parse_assignments
    from .data import load_dataset
    from .utils import perturbation_path

    eps = _eps(a.eps)
    out, note = perturbation_path(a.out)  # told with the result below
    enc = api.load_encoder(a.encoder)
    dm = load_dataset(
        a.surrogate,
        root=a.data_root,
        image_size=a.image_size or None,
        n_train=a.n_train,
        n_val=a.n_val,
        seed=a.seed or 0,
        download=bool(a.download),
        surrogate_reserve=a.surrogate_reserve,
    )
    sur = dm.surrogate(a.n_surrogate)
    from .distributed import main_process

    main = main_process()  # under torchrun every process crafts its share; rank 0 writes and speaks
    pert = api.craft(
        enc,
        a.attack,
        sur,
        eps,
        preset=a.preset,
        seed=a.seed or 0,
        device=a.device or "auto",
        out=out,
        log=_log(a) if main else None,
        dist_backend=a.dist_backend,
        **parse_assignments(a.sets),
    )
    if not main:
        return 0
    from .visualize import save_perturbation_images

    pics = save_perturbation_images(pert, sur.subset(8), out)
    print(f"wrote {out} ({pert.attack}, eps={pert.eps:.4f}, linf={pert.linf():.4f}) and {', '.join(map(str, pics))}")
    if note:
        print(f"note: {note}")
    return 0


def perturbation_names(paths: list[str]) -> dict[str, str]:
    """Entry names for perturbation files: the file's stem, or ``folder/stem`` where two files
    share a stem; the same file twice is an error."""
    from .errors import ConfigError

    resolved = [str(Path(p).resolve()) for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = sorted({p for p in paths if resolved.count(str(Path(p).resolve())) > 1})
        raise ConfigError(f"the same perturbation file is given twice: {', '.join(dup)}")
    stems = [Path(p).stem for p in paths]
    out = {}
    for p, stem in zip(paths, stems):
        name = stem if stems.count(stem) == 1 else f"{Path(p).resolve().parent.name}/{stem}"
        if name in out:
            name = str(Path(p).with_suffix(""))
        out[name] = p
    return out


def cmd_evaluate(a) -> int:
    from . import api
    from .config import parse_assignments

    if a.seed is not None:
        from .errors import ConfigError

        raise ConfigError(
            "genaf evaluate uses the run's own seed (its config.yaml) for every random start; drop --seed"
        )
    perts = perturbation_names(a.perturbation)
    opts = parse_assignments(a.sets)
    m = api.evaluate(
        a.model,
        perts,
        dataset=a.dataset,
        device=a.device or "auto",
        whitebox=a.whitebox,
        autoattack=a.autoattack,
        resize=a.resize,
        per_sample={name: dict(opts) for name in a.attack},
        preset=a.preset,
        split=a.split,
        out=a.out,
        log=_log(a),
    )
    if a.split == "val":
        m = {**m["validation"], "n_test": m["validation"].get("n_val")}
    print(_summary(m))
    if a.out:
        print(f"results written to {a.out}")
    return 0


def cmd_assess(a) -> int:
    from .assess import run_assess, summary_lines

    res = run_assess(
        a.encoder,
        a.dataset,
        a.out,
        surrogate=a.surrogate,
        same_domain=a.same_domain,
        eps=_eps(a.eps),
        epochs=a.epochs,
        quick=a.quick,
        n_surrogate=a.n_surrogate,
        regimes=a.regimes,
        data={
            "root": a.data_root,
            "image_size": a.image_size,
            "n_train": a.n_train,
            "n_val": a.n_val,
            "n_test": a.n_test,
            "download": a.download,
            "surrogate_reserve": a.surrogate_reserve,
        },
        batch_size=128 if a.batch_size is None else a.batch_size,
        device=a.device or "auto",
        seed=a.seed or 0,
        log=_log(a) or _silent,
    )
    _warn_checks({"checks": res["sft"].get("checks") or {}})
    for line in summary_lines(res):
        print(line)
    print(f"report: {Path(a.out) / 'assess.md'}")
    return 0


def cmd_pretrain(a) -> int:
    from .data import load_dataset
    from .encoders.base import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD
    from .encoders.files import save_encoder
    from .errors import ConfigError
    from .pretrain import image_stats, mix_train, pretrain, pretrain_meta, probe_report, split_mix
    from .utils import resolve_device

    names = split_mix(a.dataset)
    mean, std = DATASET_STATS.get(a.dataset, (IMAGENET_MEAN, IMAGENET_STD))
    if a.image_size is not None:  # refuse an arch or size the backbone cannot take before loading data
        pretrain_meta(a.arch, a.image_size, mean, std, a.dataset, a.width)
    share = a.n_images // len(names)  # a mix: an equal share of the images from each dataset
    if share < 1:
        raise ConfigError(f"--n-images {a.n_images} leaves no image for each of the {len(names)} datasets of the mix")
    dms = [
        load_dataset(
            name,
            root=a.data_root if len(names) == 1 else None,
            image_size=a.image_size,
            n_train=share,
            n_val=min(1000, max(1, share // 10)),
            n_test=a.n_test,
            seed=a.seed or 0,
        )
        for name in names
    ]
    train = dms[0].train if len(dms) == 1 else mix_train([d.train for d in dms], a.seed or 0)
    if len(dms) > 1:  # no dataset's statistics describe the mix: its own are measured
        mean, std = image_stats(train)
    meta = pretrain_meta(a.arch, dms[0].image_size, mean, std, a.dataset, a.width)
    enc = pretrain(
        train,
        meta,
        method=a.method,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed or 0,
        device=resolve_device(a.device or "auto"),
        log=_log(a) or _silent,
    )
    save_encoder(enc, a.out)
    if len(dms) == 1:
        rep = probe_report(enc, dms[0], log=_log(a) or _silent)
    else:  # each domain's held-out test split, probed with that domain's training images
        rep = {"per_dataset": {d.name: probe_report(enc, d, log=_log(a) or _silent) for d in dms}}
    print(json.dumps({"out": a.out, **rep}, indent=2))
    return 0


def cmd_export(a) -> int:
    from . import api

    res = api.export(a.run, a.format, a.out, verify=not a.no_verify)
    checked = "not checked"
    if res["verified"]:
        checked = f"features equal to the run's encoder (max |diff| {res['max_abs_diff']:.2g})"
    print(
        f"wrote {res['out']} ({res['format']} {res['arch']}, {res['tensors']} tensors, {res['parameters']:,} "
        f"parameters); load it with {res['load_with']}; {checked}"
    )
    out = res["out"]
    read = (
        f"state = safetensors.torch.load_file('{out}')"
        if Path(out).suffix.lower() == ".safetensors"
        else f"state = torch.load('{out}', weights_only=True)"
    )
    if res["format"] == "torchvision":
        print(
            f"in torchvision: {read}; m = torchvision.models.{res['arch']}(); m.fc = torch.nn.Identity(); "
            "m.load_state_dict(state); m takes ImageNet-normalised images (genaf's encoder takes [0,1] images and "
            "normalises them itself)"
        )
    elif res["format"] == "timm":
        print(f"in timm: {read}; m = timm.create_model('{res['arch']}', num_classes=0); m.load_state_dict(state)")
    print(f"note: {res['head']}")
    return 0


def cmd_inspect(a) -> int:
    from . import api

    info = api.load_encoder(a.spec).describe()
    if a.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            if k == "keys":
                v = _keys_line(v)
            elif k == "source_files":
                v = "; ".join(f"{f.get('path')} sha256 {f.get('sha256')}" for f in v) or "none"
            print(f"{k:>16s}: {v}")
    return 0


def _keys_line(keys: dict) -> str:
    """'loaded 43, missing 0, unexpected 2 (a, b); note' for `genaf inspect`."""

    def few(items: list) -> str:
        return ", ".join(items[:4]) + (f", ... +{len(items) - 4} more" if len(items) > 4 else "")

    out = f"loaded {keys.get('loaded')}"
    for kind in ("missing", "unexpected"):
        items = list(keys.get(kind) or [])
        out += f", {kind} {len(items)}" + (f" ({few(items)})" if items else "")
    return out + (f"; {keys['note']}" if keys.get("note") else "")


def cmd_encoders(a) -> int:
    from .encoders.zoo import zoo_rows

    rows = zoo_rows()
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(row["name"])
        for k in ("spec", "source", "sha256"):
            print(f"    {k:>7s}: {row[k]}")
    print("genaf records the sha256 of every encoder file a run reads in config.yaml and metrics.json (encoder_files).")
    return 0


def cmd_demo(a) -> int:
    from .demo import default_out, run_demo

    out = a.out or default_out(a.encoder)
    run_demo(out, quick=a.quick, device=a.device or "auto", seed=a.seed or 0, log=_log(a) or _silent,
             deterministic=a.deterministic, encoder=a.encoder)
    if a.quiet:
        print(f"report: {Path(out) / 'report.md'}")
    return 0


def cmd_bench(a) -> int:
    from .bench import run_bench

    res = run_bench(
        a.config,
        a.out,
        device=a.device,
        shard=a.shard,
        update_lock=a.update_lock,
        log=_log(a) or _silent,
        ray=a.ray,
        ray_cpus_per_task=a.ray_cpus_per_task,
        ray_cpus=a.ray_cpus,
    )
    if res["results"] is None:
        print(f"{len(res['rows'])} result rows of this shard in {a.out}/shards; merge with: genaf report {a.out}")
    else:
        print(f"{len(res['rows'])} result rows in {res['results']}; report: {res['report']}")
    return 0


def cmd_report(a) -> int:
    from .bench import merge_shards
    from .bench_report import build_report

    if not merge_shards(a.dir):
        from .errors import ConfigError

        raise ConfigError(f"{a.dir}: some shards have not finished; run genaf report again when they have")
    print(f"report: {build_report(a.dir)}")
    return 0


COMMANDS = {
    "finetune": cmd_finetune,
    "attack": cmd_attack,
    "evaluate": cmd_evaluate,
    "assess": cmd_assess,
    "pretrain": cmd_pretrain,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "encoders": cmd_encoders,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "report": cmd_report,
}


def _apply_limits(items: list[str]) -> None:
    from . import limits

    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise limits.LimitError(f"--limit takes NAME=VALUE, got '{item}'")
        limits.set_limit(name.strip().replace("-", "_"), value.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:  # plain `genaf`: the commands, not "the following arguments are required"
        parser.print_help(sys.stderr)
        print("\ngenaf: give a command (genaf COMMAND --help for its options)", file=sys.stderr)
        return 2
    from .utils import set_quiet

    was_quiet = set_quiet(bool(getattr(args, "quiet", False)))
    if getattr(args, "deterministic", None):  # cuBLAS reads it when CUDA starts
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import warnings

    # One line per warning (e.g. the placeholders a checkpoint was read with), like errors.
    warnings.formatwarning = lambda msg, cat, *_a, **_k: f"genaf {args.cmd}: warning: {msg}\n"
    try:
        _apply_limits(getattr(args, "limit", None) or [])
        check_encoder_spec(getattr(args, "encoder", None) or getattr(args, "spec", None))
        return COMMANDS[args.cmd](args)
    except GenafError as exc:
        if getattr(args, "debug", False):
            raise
        msg = str(exc).replace("\n", " ")
        print(f"genaf {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"genaf {args.cmd}: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genaf {args.cmd}: interrupted", file=sys.stderr)
        return 130
    finally:
        set_quiet(was_quiet)


if __name__ == "__main__":
    sys.exit(main())
