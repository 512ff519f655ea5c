"""ResNet backbones with torchvision's parameter names, a width option and a CIFAR stem.

The module names match torchvision's ``resnet18``/``resnet50`` exactly (``conv1``, ``bn1``,
``layer1.0.conv1`` ...), so torchvision and solo-learn state dicts load without renaming.
The residual blocks are written here with torchvision's layout (``conv1``/``bn1``/``conv2``/``bn2``
and, for ``Bottleneck``, ``conv3``/``bn3``; the stride on the 3x3 convolution, as torchvision's
v1.5), so building a backbone does not import torchvision (whose import pulls in
``torch._dynamo``: about two seconds on every command). Differences that matter for public
checkpoints are parameters:

- ``stem="imagenet"``: 7x7 stride-2 conv (padding 3) and a 3x3 max-pool (torchvision);
- ``stem="cifar"``: 3x3 stride-1 conv with ``stem_padding`` (solo-learn uses **2**) and no
  max-pool (``maxpool`` is ``nn.Identity``).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import limits
from ..errors import CheckpointError, SpecError


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (torchvision's ``BasicBlock``, its names)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convolutions and a shortcut (torchvision's ``Bottleneck``, its names)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)

ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetBackbone(nn.Module):
    """A torchvision-compatible ResNet trunk returning pooled features (no ``fc``).

    Input: a normalised NCHW float tensor. Output: (N, feature_dim) features.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        width: int = 64,
        stem: str = "imagenet",
        stem_padding: int | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            from .vit import VIT_ARCHS

            raise SpecError(f"unknown arch '{arch}'; choose one of: {', '.join([*ARCHS, *VIT_ARCHS])}")
        if stem not in ("imagenet", "cifar"):
            raise SpecError(f"unknown stem '{stem}'; use 'imagenet' or 'cifar'")
        block, layers = ARCHS[arch]
        self.arch, self.width, self.stem = arch, int(width), stem
        self.inplanes = int(width)
        if stem == "cifar":
            self.stem_padding = 1 if stem_padding is None else int(stem_padding)
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 3, 1, self.stem_padding, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.stem_padding = 3 if stem_padding is None else int(stem_padding)
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 7, 2, self.stem_padding, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        w = int(width)
        self.layer1 = self._make_layer(block, w, layers[0])
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 8 * w * block.expansion
        for m in self.modules():
            if getattr(m, "weight", None) is not None and m.weight.is_meta:
                continue  # built to be measured only (check_backbone); initialising on meta imports torch._dynamo
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(meta: dict) -> nn.Module:
    """Build a backbone from an encoder's metadata dict: a genaf ViT when ``arch`` names one
    (:mod:`genaf.encoders.vit`), else a ResNet (arch, width, stem, stem_padding)."""
    from .vit import build_vit, is_vit_arch

    if is_vit_arch(meta.get("arch")):
        return build_vit(meta)
    return ResNetBackbone(
        arch=meta.get("arch", "resnet18"),
        width=int(meta.get("width", 64)),
        stem=meta.get("stem", "imagenet"),
        stem_padding=meta.get("stem_padding"),
        in_chans=int(meta.get("in_chans", 3)),
    )


def _small_int(meta: dict, key: str, default: int, lo: int, what: str) -> int:
    value = meta.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < lo:
        raise CheckpointError(f"{what}: '{key}' must be a whole number >= {lo}, got {value!r}")
    return int(value)


def check_backbone(meta: dict, what: str, on_disk: int | None = None) -> int:
    """Check an encoder description before building it; returns its parameter bytes (float32).

    ``width`` and ``in_chans`` are checked against ``max_width``; the network is then built on
    the meta device (no memory), and its size checked against ``max_file_bytes`` and, when the
    weights come from a file of ``on_disk`` bytes, ``max_file_expansion`` × that size: a file
    cannot fill a network larger than what it holds.
    """
    width = _small_int(meta, "width", 64, 1, what)
    limits.check("max_width", width, f"{what}: encoder width")
    limits.check("max_width", _small_int(meta, "in_chans", 3, 1, what), f"{what}: encoder input channels")
    padding = _small_int(meta, "stem_padding", 0, 0, what)
    if padding > 16:
        raise CheckpointError(f"{what}: stem_padding {padding} is not a ResNet stem (expected 1-3)")
    from .base import build_any_backbone  # timm and Hugging Face backbones too

    with torch.device("meta"):
        module = build_any_backbone(meta)
    return check_module_bytes(module, what, on_disk)


def check_module_bytes(module: nn.Module, what: str, on_disk: int | None = None) -> int:
    """Bytes of ``module``'s state (float32) against ``max_file_bytes`` and the file's size."""
    nbytes = sum(t.numel() * 4 for t in module.state_dict().values())
    arch = getattr(module, "arch", type(module).__name__)
    desc = f"{what}: a {arch} of {nbytes // 4:,} parameters"
    if on_disk is None:
        limits.check("max_file_bytes", nbytes, desc)
    else:
        limits.check_expansion(nbytes, on_disk, desc)
    return nbytes
