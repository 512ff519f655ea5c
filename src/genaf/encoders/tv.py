"""torchvision classification weights (``torchvision:ARCH:PATH``) as a genaf encoder.

``PATH`` is a state dict saved with ``torch.save`` (``.pth``/``.pt``, read with the safe reader in
:mod:`genaf.encoders.safe_load`) or a ``.safetensors`` file, possibly wrapped as
``{'state_dict': ...}`` or ``{'model': ...}`` and possibly with DataParallel's ``module.`` prefix.
The classifier (``fc.*``) is dropped; the trunk uses torchvision's ImageNet stem and ImageNet
normalisation, and loads strictly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, unknown
from .base import IMAGENET_MEAN, IMAGENET_STD, Encoder, encoder_from_state
from .resnet import ARCHS, check_backbone
from .safe_load import check_safetensors, read_checkpoint, tensor_dict

__all__ = ["load_torchvision_encoder", "read_state_file"]


def load_torchvision_encoder(arch: str, path: str | os.PathLike) -> Encoder:
    """Load a torchvision ResNet's weights (``fc`` dropped) as an ImageNet-normalised encoder (eval mode)."""
    if arch not in ARCHS:
        raise unknown("torchvision arch", arch, ARCHS)
    path = Path(path)
    what = f"torchvision {arch} weights {path}"
    state = read_state_file(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        found = ", ".join(list(state)[:8]) or "no tensors"
        raise CheckpointError(f"{what} have no 4-d 'conv1.weight' (found: {found}); not a torchvision ResNet")
    if tuple(conv1.shape[-2:]) != (7, 7):
        raise CheckpointError(
            f"{what}: conv1 has a {conv1.shape[-2]}x{conv1.shape[-1]} kernel, not torchvision's 7x7 "
            "(a CIFAR-stem model? solo-learn checkpoints load with solo:PATH)"
        )
    from .solo import infer_resnet_arch

    inferred = infer_resnet_arch(state, what)
    if inferred != arch:
        raise CheckpointError(f"{what}: the weights are a {inferred}, not a {arch}; use torchvision:{inferred}:PATH")
    meta = {
        "arch": arch,
        "width": int(conv1.shape[0]),
        "stem": "imagenet",
        "stem_padding": 3,
        "in_chans": int(conv1.shape[1]),
        "input_size": 224,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        # a torchvision-format file does not say how its weights were trained (torchvision's own
        # are supervised on ImageNet, but any ResNet state dict has this format): not guessed
        "method": "unknown",
        "pretrain_dataset": "unknown",
        "source": f"torchvision:{arch}:{path}",
    }
    check_backbone(meta, what, path.stat().st_size)
    return encoder_from_state(meta, state, what).eval()


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a ``.safetensors`` file or a (wrapped) ``torch.save`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path, "weights file")
        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    return tensor_dict(read_checkpoint(path), f"weights file {path}")
