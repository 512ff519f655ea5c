"""Where the layers of a backbone are, found by module type (not by architecture name).

Attacks name layers the torchvision-ResNet way (``relu``: the stem's output; ``layer1``..``layer4``:
the four stages), and their presets say so. A backbone without those modules gets them as
*aliases*, so the same presets run on any encoder:

- **stages** (a CNN: timm ConvNeXt, ...): the first ``nn.ModuleList`` / ``nn.Sequential`` whose
  children are all of one type and each hold a list of blocks (``stages.0``..``stages.3``);
  ``layerK`` is the stage that ends the K-th quarter of them (4 stages: stages.0..3);
- **blocks** (a transformer: genaf and timm ViTs ``blocks``, Hugging Face ``encoder.layer``), when
  there are no stages: the longest such list whose children all have one type and contain an
  ``nn.Linear``; ``layerK`` is the block that ends the K-th quarter, ``blocks[ceil(K·depth/4) − 1]``
  (depth 4: blocks 0, 1, 2, 3; depth 12: blocks 2, 5, 8, 11);
- the **stem** (``relu``): on a CNN the first activation module registered after the first
  convolution and before the first stage (timm ResNet's ``act1``), else the container of that
  convolution (ConvNeXt's ``stem``); on a transformer the patch embedding's convolution
  (``patch_embed.proj``).

A real module of that name always wins over an alias, and a torchvision/solo-learn ResNet (which
has them all) gets none.
"""

from __future__ import annotations

import math

from torch import nn

STAGE_ALIASES = ("layer1", "layer2", "layer3", "layer4")
STEM_ALIAS = "relu"
_LISTS = (nn.ModuleList, nn.Sequential)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish)


def _homogeneous(mod: nn.Module, least: int) -> list[tuple[str, nn.Module]] | None:
    if not isinstance(mod, _LISTS):
        return None
    children = list(mod.named_children())
    if len(children) < least or len({type(c) for _, c in children}) != 1:
        return None
    return children


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _inner_blocks(prefix: str, stage: nn.Module) -> list[str]:
    """The blocks of one stage: the children of its longest homogeneous list, by full name."""
    best: list[str] = []
    for name, mod in stage.named_modules():
        children = _homogeneous(mod, 1)
        if children and len(children) > len(best):
            best = [_join(_join(prefix, name), c) for c, _ in children]
    return best


def stage_names(backbone: nn.Module) -> list[str]:
    """A CNN's stages (see the module docstring): ``layer1..4`` on a torchvision-style ResNet,
    else a list of like stages that each hold blocks; [] for a transformer."""
    names = {n for n, _ in backbone.named_modules()}
    if all(s in names for s in STAGE_ALIASES):
        return list(STAGE_ALIASES)
    for name, mod in backbone.named_modules():
        children = _homogeneous(mod, 2)
        if children and all(_inner_blocks("", c) for _, c in children):
            return [_join(name, c) for c, _ in children]
    return []


def block_names(backbone: nn.Module) -> list[str]:
    """A transformer's blocks (see the module docstring); [] for a CNN or when none are found."""
    if stage_names(backbone):
        return []
    best: list[str] = []
    for name, mod in backbone.named_modules():
        children = _homogeneous(mod, 2)
        if not children or not any(isinstance(m, nn.Linear) for m in children[0][1].modules()):
            continue
        if len(children) > len(best):
            best = [_join(name, c) for c, _ in children]
    return best


def stem_name(backbone: nn.Module) -> str | None:
    """The module whose output is the stem's (see the module docstring), or None."""
    order = list(backbone.named_modules())
    first = next((i for i, (_, m) in enumerate(order) if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    conv = order[first][0]
    stages = stage_names(backbone)
    if not stages:
        return conv
    end = next((i for i, (n, _) in enumerate(order) if n == stages[0]), len(order))
    act = next((n for n, m in order[first + 1 : end] if isinstance(m, _ACTIVATIONS)), None)
    if act is not None:
        return act
    parent = conv.rpartition(".")[0]
    return parent or conv


def layer_aliases(backbone: nn.Module) -> dict[str, str]:
    """``{alias: module name}`` for the ResNet layer names this backbone lacks (see above)."""
    names = {n for n, _ in backbone.named_modules()}
    units = stage_names(backbone) or block_names(backbone)
    if not units:
        return {}
    out: dict[str, str] = {}
    if STEM_ALIAS not in names:
        stem = stem_name(backbone)
        if stem is not None:
            out[STEM_ALIAS] = stem
    d = len(units)
    for k, alias in enumerate(STAGE_ALIASES, start=1):
        if alias not in names:
            out[alias] = units[math.ceil(k * d / 4) - 1]
    return out


def low_layers(backbone: nn.Module) -> list[str]:
    """The low layers ``layer: auto`` chooses among: the stem's output, then every block of the
    first half of the stages (a CNN) or the first half of the blocks (a transformer)."""
    stem = stem_name(backbone)
    stages = stage_names(backbone)
    if stages:
        low = [b for s in stages[: math.ceil(len(stages) / 2)] for b in _inner_blocks(s, backbone.get_submodule(s))]
    else:
        blocks = block_names(backbone)
        low = blocks[: math.ceil(len(blocks) / 2)]
    if not low:
        return []
    return ([stem] if stem else []) + low


def is_transformer(backbone: nn.Module) -> bool:
    """True when the backbone has transformer-style blocks, no CNN stages and no BatchNorm."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return False
    return bool(block_names(backbone))
