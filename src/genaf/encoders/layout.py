"""Where the layers of a backbone are, found by module type (not by architecture name).

Attacks name layers the ResNet way (``relu``: the stem's output; ``layer1``..``layer4``: the
four stages), and their presets say so. A backbone without those modules (a genaf, timm or
Hugging Face Vision Transformer) gets them as *aliases*:

- the **stem** is the first ``nn.Conv2d`` (a ViT's patch embedding, ``patch_embed.proj``);
- the **blocks** are the longest ``nn.ModuleList`` / ``nn.Sequential`` whose children all have
  the same type and contain an ``nn.Linear`` (``blocks`` in genaf and timm ViTs,
  ``encoder.layer`` in Hugging Face ones); a ResNet stage (convolutions only) is not one;
- ``layerK`` (K = 1..4) is the block that ends the K-th quarter of the blocks,
  ``blocks[ceil(K·depth/4) − 1]`` (depth 4: blocks 0, 1, 2, 3; depth 12: 2, 5, 8, 11).

A real module of that name always wins over an alias.
"""

from __future__ import annotations

import math

from torch import nn

STAGE_ALIASES = ("layer1", "layer2", "layer3", "layer4")
STEM_ALIAS = "relu"


def block_names(backbone: nn.Module) -> list[str]:
    """Full names of the transformer-style blocks (see the module docstring); [] if none."""
    best: list[str] = []
    for name, mod in backbone.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.named_children())
        if len(children) < 2 or len({type(c) for _, c in children}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in children[0][1].modules()):
            continue
        if len(children) > len(best):
            best = [f"{name}.{c}" if name else c for c, _ in children]
    return best


def stem_name(backbone: nn.Module) -> str | None:
    """The first Conv2d module's full name (a ViT's patch embedding), or None."""
    return next((n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)), None)


def layer_aliases(backbone: nn.Module) -> dict[str, str]:
    """``{alias: module name}`` for the ResNet layer names this backbone lacks (see above)."""
    names = {n for n, _ in backbone.named_modules()}
    out: dict[str, str] = {}
    blocks = block_names(backbone)
    if STEM_ALIAS not in names:
        stem = stem_name(backbone)
        if stem is not None and blocks:
            out[STEM_ALIAS] = stem
    if blocks:
        d = len(blocks)
        for k, alias in enumerate(STAGE_ALIASES, start=1):
            if alias not in names:
                out[alias] = blocks[math.ceil(k * d / 4) - 1]
    return out


def is_transformer(backbone: nn.Module) -> bool:
    """True when the backbone has transformer-style blocks and no BatchNorm (a ViT)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return False
    return bool(block_names(backbone))
