"""The demo encoder: a narrow CIFAR-stem ResNet-18 pre-trained with SimCLR on Fashion-MNIST.

It ships inside the package (``genaf/assets/demo_encoder.safetensors``, about 3 MB) so the
demo needs no network. ``genaf pretrain --preset demo`` rebuilds it; if the asset is missing
the same recipe runs once and caches the result under ``$GENAF_CACHE`` (default
``~/.cache/genaf``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SpecError
from .base import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Encoder
from .resnet import build_backbone

DEMO_META: dict = {
    "arch": "resnet18",
    "width": 16,
    "stem": "cifar",
    "stem_padding": 1,
    "in_chans": 3,
    "input_size": 28,
    "mean": list(FASHION_MNIST_MEAN),
    "std": list(FASHION_MNIST_STD),
    "pretrain_dataset": "fashion-mnist",
}

_FM_NORM = {"mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD), "pretrain_dataset": "fashion-mnist"}

# The demo ViT: genaf's vit-tiny at Fashion-MNIST's 28 px (7 × 7 patches of 4 px).
DEMO_META_VIT: dict = {
    "arch": "vit-tiny",
    "patch_size": 4,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
    "mlp_ratio": 4.0,
    "pool": "cls",
    "in_chans": 3,
    "input_size": 28,
    **_FM_NORM,
}

ASSET = Path(__file__).resolve().parent.parent / "assets" / "demo_encoder.safetensors"
# The demo ViT (``demo-vit``): vit-tiny pre-trained with SimCLR on Fashion-MNIST by
DEMO_VIT_COMMAND = (
    "OMP_NUM_THREADS=2 genaf pretrain --arch vit-tiny --dataset fashion-mnist --method simclr --epochs 12 "
    "--batch-size 256 --n-images 15000 --lr 1e-3 --seed 0 --out src/genaf/assets/demo_vit_encoder.safetensors"
)
ASSET_VIT = ASSET.with_name("demo_vit_encoder.safetensors")
# The two-domain demo ViT (``demo-vit-mix``): vit-tiny pre-trained with SimCLR on 8,000
# Fashion-MNIST and 8,000 rendered-digit training images, shuffled together (issue 17's stronger
# encoders: a k-NN gap over random weights of 21.6 points on Fashion-MNIST and 48.5 on digits)
DEMO_VIT_MIX_COMMAND = (
    "OMP_NUM_THREADS=2 genaf pretrain --arch vit-tiny --dataset fashion-mnist+rendered-digits --method simclr "
    "--epochs 12 --batch-size 256 --n-images 16000 --lr 1e-3 --seed 0 "
    "--out src/genaf/assets/demo_vit_mix_encoder.safetensors"
)
ASSET_VIT_MIX = ASSET.with_name("demo_vit_mix_encoder.safetensors")


def cache_dir() -> Path:
    return Path(os.environ.get("GENAF_CACHE", Path.home() / ".cache" / "genaf"))


def demo_encoder() -> Encoder:
    """The shipped demo encoder (or a cached rebuild when the asset is absent)."""
    from .files import load_encoder_file

    if ASSET.is_file():
        enc = load_encoder_file(ASSET)
    else:
        cached = cache_dir() / "demo_encoder.safetensors"
        if not cached.is_file():
            from ..pretrain import pretrain_demo_encoder

            pretrain_demo_encoder(cached)
        enc = load_encoder_file(cached)
    enc.meta["source"] = "demo"
    return enc


def demo_vit_encoder() -> Encoder:
    """The shipped demo ViT (``demo-vit``); a missing asset is an error naming the command that
    makes it (no silent fallback to another encoder)."""
    from .files import load_encoder_file

    if not ASSET_VIT.is_file():
        raise SpecError(f"the demo ViT's file {ASSET_VIT} is missing; make it with: {DEMO_VIT_COMMAND}")
    enc = load_encoder_file(ASSET_VIT)
    enc.meta["source"] = "demo-vit"
    return enc


def demo_vit_mix_encoder() -> Encoder:
    """The shipped two-domain demo ViT (``demo-vit-mix``); a missing asset is an error naming the
    command that makes it."""
    from .files import load_encoder_file

    if not ASSET_VIT_MIX.is_file():
        raise SpecError(f"the two-domain demo ViT's file {ASSET_VIT_MIX} is missing; make it: {DEMO_VIT_MIX_COMMAND}")
    enc = load_encoder_file(ASSET_VIT_MIX)
    enc.meta["source"] = "demo-vit-mix"
    return enc


def random_meta(name: str) -> dict:
    """The metadata of ``random:NAME``: 'demo' (the demo ResNet) or a genaf ViT arch such as
    'vit-tiny' (at the demo's 28 px and Fashion-MNIST normalisation)."""
    from .vit import VIT_ARCHS, vit_meta

    if name == "demo":
        return dict(DEMO_META)
    if name in VIT_ARCHS:
        return dict(DEMO_META_VIT if name == DEMO_META_VIT["arch"] else vit_meta(name, 28), **_FM_NORM)
    raise SpecError(
        f"random:{name} is not available; use random:demo or one of " + ", ".join(f"random:{a}" for a in VIT_ARCHS)
    )


def random_encoder(name: str = "demo", seed: int = 0) -> Encoder:
    """The architecture of ``name`` (see :func:`random_meta`) with seeded random weights."""
    meta = dict(random_meta(name), method="random-init", source=f"random:{name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(meta)
    return Encoder(backbone, meta)
