"""Helpers for the encoder-loading tests: small models with non-trivial BatchNorm state, zip surgery."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torchvision
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (eval mode matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def tv_cifar_resnet18(seed: int = 0) -> nn.Module:
    """torchvision resnet18 with solo-learn's CIFAR stem (3x3, stride 1, padding 2, no max-pool), no fc."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return randomize_bn(model, seed).eval()


def tv_resnet18(seed: int = 0) -> nn.Module:
    """A plain torchvision resnet18 (ImageNet stem) with random weights and BN statistics."""
    torch.manual_seed(seed)
    return randomize_bn(torchvision.models.resnet18(), seed).eval()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
    """Copy a torch.save archive, replacing (bytes) or dropping (None) entries by suffix."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            hit = next((k for k in replace if info.filename.endswith(k)), None)
            if hit is None:
                zout.writestr(info.filename, zin.read(info))
            elif replace[hit] is not None:
                zout.writestr(info.filename, replace[hit])


def zip_prefix(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith("/data.pkl"))[: -len("/data.pkl")]
