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

ASSET = Path(__file__).resolve().parent.parent / "assets" / "demo_encoder.safetensors"


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


def random_encoder(name: str = "demo", seed: int = 0) -> Encoder:
    """The architecture of ``name`` (only 'demo' for now) with seeded random weights."""
    if name != "demo":
        raise SpecError(f"random:{name} is not available; use random:demo")
    meta = dict(DEMO_META, method="random-init", source=f"random:{name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(meta)
    return Encoder(backbone, meta)
