"""Tiny encoder files for tests whose subject is not the encoder (splits, records, the CLI's
plumbing): the demo architectures at small widths, with seeded random weights."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from genaf.encoders import Encoder, save_encoder
from genaf.encoders.demo import DEMO_META, DEMO_META_VIT
from genaf.encoders.resnet import build_backbone

TINY_RESNET = dict(DEMO_META, width=4)


def write_encoder(path: Path, meta: dict, seed: int = 0) -> str:
    """An encoder with architecture ``meta`` and seeded random weights, saved at ``path``; its spec."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = Encoder(build_backbone(meta), dict(meta, method="random-init"))
    save_encoder(enc, path)
    return f"file:{path}"


def tiny_resnet(folder: Path, seed: int = 0) -> str:
    """The demo ResNet-18's shape at width 4 (about 45 k parameters), as ``folder/resnet.safetensors``."""
    return write_encoder(folder / "resnet.safetensors", TINY_RESNET, seed)


def tiny_vit(folder: Path) -> str:
    """genaf's ViT at width 32, depth 2, 2 heads, stored for 28 px (so 16 px interpolates)."""
    return write_encoder(folder / "vit.safetensors", dict(DEMO_META_VIT, embed_dim=32, depth=2, num_heads=2))


@functools.cache
def shared_tiny_resnet() -> str:
    """One width-4 demo ResNet file per test process (in a temporary folder), for module constants."""
    return tiny_resnet(Path(tempfile.mkdtemp(prefix="genaf-test-encoder-")))
