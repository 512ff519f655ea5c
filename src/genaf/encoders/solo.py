"""solo-learn checkpoints (``solo:PATH``): the pre-trained backbone of a Lightning ``.ckpt``.

A solo-learn checkpoint is a Lightning file whose ``state_dict`` holds the backbone under
``backbone.*`` (older releases: ``encoder.*``) next to heads genaf does not need (``projector.*``,
``predictor.*``, ``momentum_backbone.*``, ``classifier.*``, ``prototypes.*``, ``queue`` ...). It is
read with :func:`genaf.encoders.safe_load.read_checkpoint`, so no code in the file runs and
neither Lightning, omegaconf nor solo-learn is needed.

solo-learn writes ``args.json`` beside the checkpoint; genaf reads both of its layouts:

- flat (solo-learn <= 1.0.5): ``{"method": "simclr", "backbone": "resnet18", "dataset": "cifar10",
  "cifar": true, ...}`` (older: ``"encoder"`` instead of ``"backbone"``);
- Hydra-nested (newer): ``{"method": "simclr", "backbone": {"name": "resnet18", "kwargs": {}},
  "data": {"dataset": "cifar10", ...}, ...}``.

Without ``args.json`` the architecture and stem are inferred from the weights. CIFAR
pre-training uses solo-learn's stem: a 3x3 stride-1 ``conv1`` with padding **2** and no max-pool.
The encoder normalises with the pre-training dataset's statistics.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .base import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD, Encoder, encoder_from_state
from .resnet import ARCHS, check_backbone
from .safe_load import extract_state_dict, read_checkpoint, tensor_dict

CIFAR_DATASETS = ("cifar10", "cifar100")
SOLO_CIFAR_STEM_PADDING = 2
BACKBONE_PREFIXES = ("backbone.", "encoder.")

__all__ = ["infer_resnet_arch", "load_solo_encoder", "read_solo_args", "solo_meta"]


def load_solo_encoder(path: str | os.PathLike) -> Encoder:
    """Load the backbone of a solo-learn checkpoint as a genaf :class:`Encoder` (strict, eval mode)."""
    path = Path(path)
    what = f"solo-learn checkpoint {path}"
    state = tensor_dict(read_checkpoint(path), what)
    prefix, backbone = extract_state_dict(state, BACKBONE_PREFIXES, f"checkpoint {path}")
    backbone = {k: v for k, v in backbone.items() if not k.startswith("fc.")}
    args = read_solo_args(path.parent / "args.json")
    meta = solo_meta(backbone, args, what)
    meta["source"] = f"solo:{path}"
    check_backbone(meta, what, path.stat().st_size)
    return encoder_from_state(meta, backbone, f"{what} ('{prefix}*' weights)").eval()


def read_solo_args(path: str | os.PathLike) -> dict[str, Any] | None:
    """The interesting parts of solo-learn's ``args.json`` (either layout), or None if absent.

    Returns ``{"arch", "dataset", "method", "cifar", "mean", "std"}`` with None for what the file
    does not say.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); fix or remove it") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(raw).__name__}")

    backbone = raw.get("backbone", raw.get("encoder"))
    if isinstance(backbone, dict):  # Hydra layout
        arch = backbone.get("name")
    else:
        arch = backbone
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    dataset = data.get("dataset", raw.get("dataset"))
    method = raw.get("method")
    cifar = raw.get("cifar")
    mean, std = raw.get("mean"), raw.get("std")
    augs = raw.get("augmentations")
    if mean is None and isinstance(augs, list) and augs and isinstance(augs[0], dict):
        mean, std = augs[0].get("mean"), augs[0].get("std")
    return {
        "arch": str(arch).lower() if isinstance(arch, str) else None,
        "dataset": str(dataset).lower() if isinstance(dataset, str) else None,
        "method": str(method) if isinstance(method, str) else None,
        "cifar": bool(cifar) if isinstance(cifar, bool) else None,
        "mean": _triple(mean),
        "std": _triple(std),
    }


def infer_resnet_arch(state: dict[str, torch.Tensor], what: str) -> str:
    """resnet18 / resnet34 / resnet50 from a backbone state dict's block layout."""
    bottleneck = any(re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", k) for k in state)
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(idx))
    for name, (block, layers) in ARCHS.items():
        if list(layers) == blocks and (block.expansion == 4) == bottleneck:
            return name
    kind = "bottleneck" if bottleneck else "basic"
    raise CheckpointError(
        f"{what}: backbone has {kind} blocks {blocks} per stage, which matches none of the supported "
        f"ResNets ({', '.join(ARCHS)})"
    )


def solo_meta(state: dict[str, torch.Tensor], args: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """Encoder metadata (arch, stem, width, normalisation ...) from the weights and ``args.json``."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise CheckpointError(f"{what}: the backbone has no 4-d 'conv1.weight', so it is not a ResNet")
    args = args or {}
    notes: list[str] = []

    inferred = infer_resnet_arch(state, what)
    arch = args.get("arch")
    if arch is None:
        arch = inferred
        notes.append("arch inferred from the weights")
    elif arch not in ARCHS:
        raise CheckpointError(
            f"{what}: args.json names backbone '{arch}', which genaf does not support; supported: {', '.join(ARCHS)}"
        )
    elif arch != inferred:
        raise CheckpointError(f"{what}: args.json says '{arch}' but the weights are a {inferred}")

    kernel = tuple(conv1.shape[-2:])
    if kernel == (3, 3):
        weight_stem = "cifar"
    elif kernel == (7, 7):
        weight_stem = "imagenet"
    else:
        raise CheckpointError(f"{what}: conv1 has a {kernel[0]}x{kernel[1]} kernel; expected 3x3 or 7x7")
    dataset = args.get("dataset")
    if args.get("cifar") is not None:
        args_stem = "cifar" if args["cifar"] else "imagenet"
    elif dataset is not None:
        args_stem = "cifar" if dataset in CIFAR_DATASETS else "imagenet"
    else:
        args_stem = None
        notes.append("stem inferred from conv1")
    if args_stem is not None and args_stem != weight_stem:
        raise CheckpointError(
            f"{what}: args.json implies the {args_stem} stem (dataset {dataset}) but conv1 has a "
            f"{kernel[0]}x{kernel[1]} kernel ({weight_stem} stem)"
        )
    stem = weight_stem

    if dataset in DATASET_STATS:
        mean, std = DATASET_STATS[dataset]
    elif args.get("mean") and args.get("std"):
        mean, std = args["mean"], args["std"]
        notes.append(f"normalisation from args.json for dataset '{dataset}'")
    elif stem == "cifar":
        mean, std = DATASET_STATS["cifar10"]
        notes.append(
            f"pre-training dataset {'unknown' if dataset is None else repr(dataset)}: "
            "assumed CIFAR-10 normalisation (CIFAR stem)"
        )
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        notes.append(
            f"pre-training dataset {'unknown' if dataset is None else repr(dataset)}: assumed ImageNet normalisation"
        )

    if stem == "cifar":
        input_size = 32
    elif dataset == "stl10":
        input_size = 96
    else:
        input_size = 224

    meta: dict[str, Any] = {
        "arch": arch,
        "width": int(conv1.shape[0]),
        "stem": stem,
        "stem_padding": SOLO_CIFAR_STEM_PADDING if stem == "cifar" else 3,
        "in_chans": int(conv1.shape[1]),
        "input_size": input_size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "method": args.get("method") or "unknown",
        "pretrain_dataset": dataset or "unknown",
    }
    if notes:
        meta["notes"] = notes
    return meta


def _triple(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return None
