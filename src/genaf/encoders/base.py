"""The Encoder module: [0,1] images in, features out, normalisation inside."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from .resnet import build_backbone
from .vit import nearest_valid_sizes

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

# Normalisation of an encoder's *pre-training* dataset, by name (solo-learn's dataset names).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet100": (IMAGENET_MEAN, IMAGENET_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a module, so attacks see [0,1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise SpecError(f"mean has {len(mean)} channels but std has {len(std)}")
        if not all(math.isfinite(float(v)) for v in (*mean, *std)):
            raise SpecError(f"normalisation mean/std must be finite numbers, got mean {tuple(mean)}, std {tuple(std)}")
        if any(s <= 0 for s in std):
            raise SpecError(f"normalisation std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Encoder(nn.Module):
    """A pre-trained image encoder ``f(N(x))`` on [0,1] NCHW images.

    Attributes:
        backbone: the trunk (module names as in torchvision for ResNets).
        feature_dim: size of the returned feature vector.
        mean, std: the normalisation applied inside (the pre-training dataset's).
        input_size: the image side length the encoder was pre-trained at (informational).
        arch: architecture name. meta: everything needed to rebuild it (see ``encoders.files``).
    """

    def __init__(self, backbone: nn.Module, meta: dict) -> None:
        super().__init__()
        self.meta = copy.deepcopy(meta)
        self.normalize = Normalize(meta["mean"], meta["std"])
        self.backbone = backbone
        self.feature_dim = int(getattr(backbone, "feature_dim", meta.get("feature_dim", 0)))
        self.meta["feature_dim"] = self.feature_dim

    @property
    def arch(self) -> str:
        return str(self.meta.get("arch"))

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.meta["std"])

    @property
    def input_size(self) -> int:
        return int(self.meta.get("input_size", 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def layer_names(self) -> list[str]:
        """Names (relative to the backbone) of every module, in registration order."""
        return [n for n, _ in self.backbone.named_modules() if n]

    def weight_layer_names(self) -> list[str]:
        """Names of every Conv2d/Linear module of the backbone (attack hooks, stage 2)."""
        return [n for n, m in self.backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def check_input_size(self, h: int, w: int) -> None:
        """Raise a one-line SpecError when the backbone cannot take (h, w) images (a ViT: a side
        that is not a multiple of its patch); backbones without a constraint accept any size."""
        check = getattr(self.backbone, "check_input_size", None)
        if callable(check):
            check(int(h), int(w))

    def layer_aliases(self) -> dict[str, str]:
        """ResNet layer names (``relu``, ``layer1``..``layer4``) this backbone lacks, mapped to its
        own modules by type (a ViT's patch embedding and blocks; :mod:`genaf.encoders.layout`)."""
        from .layout import layer_aliases

        return layer_aliases(self.backbone)

    def resolve_layer(self, name: str) -> str:
        """The backbone module name that ``name`` refers to (itself, or what its alias maps to)."""
        modules = dict(self.backbone.named_modules())
        if name in modules:
            return name
        return self.layer_aliases().get(name, name)

    def get_layer(self, name: str) -> nn.Module:
        """The backbone module called ``name`` (or aliased by it, see :meth:`layer_aliases`); an
        unknown name lists the available ones."""
        modules = dict(self.backbone.named_modules())
        if name and name not in modules:
            name = self.layer_aliases().get(name, name)
        if name not in modules or not name:
            from ..errors import did_you_mean

            raise SpecError(
                f"encoder has no layer '{name}'{did_you_mean(name, modules)}; available: "
                + ", ".join(n for n in modules if n)
            )
        return modules[name]

    def describe(self) -> dict:
        """What `genaf inspect` prints: the same fields for every scheme (see docs/ENCODERS.md)."""
        meta = self.meta
        info = {
            "arch": self.arch,
            "library": meta.get("library", "genaf"),
            "source": meta.get("source"),
            "num_parameters": sum(p.numel() for p in self.backbone.parameters()),
            "feature_dim": self.feature_dim,
            "pool": meta.get("pool", "mean (global average pool)"),
            "input_size": self.input_size,
            "patch_size": meta.get("patch_size"),
            "size_rule": size_rule(meta),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": meta.get("interpolation"),
            "num_tensors": len(self.backbone.state_dict()),
        }
        if meta.get("num_prefix_tokens") is not None:
            info["prefix_tokens"] = {
                "total": meta["num_prefix_tokens"],
                "register": meta.get("num_register_tokens", 0),
            }
        keys = meta.get("keys")
        if keys:
            info["keys"] = keys
        else:
            info["keys"] = {"loaded": info["num_tensors"], "missing": [], "unexpected": [], "note": "strict load"}
        conv1 = getattr(self.backbone, "conv1", None)
        if isinstance(conv1, nn.Conv2d):
            info["stem"] = {
                "type": meta.get("stem"),
                "kernel_size": list(conv1.kernel_size),
                "stride": list(conv1.stride),
                "padding": list(conv1.padding),
                "maxpool": type(getattr(self.backbone, "maxpool", nn.Identity())).__name__,
            }
        for k in ("method", "pretrain_dataset"):  # never guessed: what the file does not state is unknown
            info[k] = meta.get(k) or "unknown"
        for k in ("width", "notes"):
            if k in meta:
                info[k] = meta[k]
        info["source_files"] = list(getattr(self, "source_files", []))
        return info


def size_rule(meta: dict) -> str:
    """The image sizes an encoder accepts, in words (for `genaf inspect`)."""
    patch = meta.get("patch_size")
    if patch:
        return f"any multiple of {patch} (position embeddings interpolated)"
    return "any size"


def check_image_size(meta: dict, size: int | tuple[int, int], where: str = "--image-size") -> None:
    """Refuse an image size that a patch-based encoder cannot take, naming the nearest valid ones."""
    patch = meta.get("patch_size")
    if not patch:
        return
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    for s in sizes:
        if int(s) % int(patch):
            valid = " or ".join(str(v) for v in nearest_valid_sizes(int(s), int(patch)))
            raise SpecError(
                f"image size {s} is not a multiple of the patch size {patch} of encoder {meta.get('arch')}; "
                f"use {valid} ({where})"
            )


class SizeWarning(UserWarning):
    """An encoder run far below the image size it was pre-trained at (its features may be poor there)."""


def warn_native_size(meta: dict, size: int | tuple[int, int], where: str = "--image-size") -> str | None:
    """Warn (and return the message) when images are a third or less of the side the encoder was
    pre-trained at, e.g. a torchvision ImageNet ResNet (224 px) run on 28 px Fashion-MNIST: such
    a run is valid but its features, and so every number of the run, may say little about the
    encoder. Encoders that state no pre-training size, or were pre-trained near this size, pass."""
    native = meta.get("input_size")
    if not native:
        return None
    sides = (size, size) if isinstance(size, int) else tuple(size)
    if 3 * max(int(v) for v in sides) > int(native):  # DINOv2 (518 px) at 224 px is common use: no warning
        return None
    import warnings

    shown = "x".join(str(int(v)) for v in sides)
    msg = (
        f"encoder {meta.get('source') or meta.get('arch')} was pre-trained at {native} px but runs on {shown} px "
        f"images; its features may be poor at this size: resize with {where} {native} (or a size near it)"
    )
    warnings.warn(msg, SizeWarning, stacklevel=2)
    return msg


def add_size_guard(backbone: nn.Module, meta: dict) -> None:
    """A forward pre-hook on a patch-based backbone: a wrong image size is a one-line error,
    whichever path (training, attack, evaluation) feeds it."""
    if not meta.get("patch_size"):
        return
    guard_meta = {"patch_size": int(meta["patch_size"]), "arch": meta.get("arch")}

    def _guard(_module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            check_image_size(guard_meta, (int(x.shape[-2]), int(x.shape[-1])), "image size")

    backbone.register_forward_pre_hook(_guard)


def build_any_backbone(meta: dict) -> nn.Module:
    """The backbone ``meta`` describes: a timm model (``library: timm``), a Hugging Face vision
    model (``library: hf``) or genaf's own ResNet."""
    library = meta.get("library")
    if library == "timm":
        from .timm_enc import build_timm_backbone

        return build_timm_backbone(meta)
    if library == "hf":
        from .hf import build_hf_backbone

        return build_hf_backbone(meta)
    return build_backbone(meta)


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a state dict strictly; on a mismatch list missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    state = dict(state)
    for k in own:  # older files omit BatchNorm's step counter; it does not affect the output
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(own[k])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {_short(shapes)}")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{what} has NaN or inf values in {len(bad)} tensor(s): {_short(bad)}")
    module.load_state_dict({k: v for k, v in state.items()}, strict=True)


def _short(items: list[str], n: int = 12) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def encoder_from_state(meta: dict, backbone_state: dict[str, torch.Tensor], what: str) -> Encoder:
    """Build the backbone described by ``meta`` and load ``backbone_state`` strictly."""
    backbone = build_any_backbone(meta)
    state = {k: v.float() if v.is_floating_point() else v for k, v in backbone_state.items()}
    load_state_strict(backbone, state, what)
    return Encoder(backbone, meta)
