"""Batched image augmentations on tensors (on the device, no PIL round trip).

All functions take and return float [0,1] NCHW batches and draw randomness from a
``torch.Generator`` so that a run is reproducible (a ``genaf.utils.RowGenerator`` draws for a
whole batch spread over several processes and keeps this process's rows).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .utils import draw


def _rand(n: int, lo: float, hi: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return draw(torch.rand, (n,), gen).to(device) * (hi - lo) + lo


def random_resized_crop_flip(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (0.75, 1.333),
    flip: bool = True,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random resized crop (area fraction in ``scale``) and horizontal flip."""
    n, dev = x.shape[0], x.device
    area = _rand(n, *scale, gen, dev)
    logr = _rand(n, torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item(), gen, dev)
    r = torch.exp(logr)
    sw = torch.sqrt(area * r).clamp(max=1.0)
    sh = torch.sqrt(area / r).clamp(max=1.0)
    tx = (_rand(n, -1, 1, gen, dev)) * (1 - sw)
    ty = (_rand(n, -1, 1, gen, dev)) * (1 - sh)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(_rand(n, 0, 1, gen, dev) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = sw * sign
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(
    x: torch.Tensor, strength: float = 0.4, p: float = 0.8, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Random brightness and contrast per sample (applied with probability ``p``)."""
    n, dev = x.shape[0], x.device
    apply = (_rand(n, 0, 1, gen, dev) < p).to(x.dtype).view(n, 1, 1, 1)
    b = _rand(n, 1 - strength, 1 + strength, gen, dev).view(n, 1, 1, 1)
    c = _rand(n, 1 - strength, 1 + strength, gen, dev).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    y = ((x * b - mean * b) * c + mean * b).clamp(0, 1)
    return apply * y + (1 - apply) * x


def ssl_view(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """One SimCLR/BYOL view: resized crop + flip + brightness/contrast jitter."""
    return color_jitter(random_resized_crop_flip(x, gen=gen), gen=gen)


def crop_flip(x: torch.Tensor, pad: int = 2, gen: torch.Generator | None = None) -> torch.Tensor:
    """Light supervised augmentation: random translation by up to ``pad`` pixels and a flip."""
    n, dev = x.shape[0], x.device
    h = x.shape[-1]
    t = pad * 2.0 / h
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    sign = torch.where(_rand(n, 0, 1, gen, dev) < 0.5, -1.0, 1.0).to(x.dtype)
    theta[:, 0, 0] = sign
    theta[:, 1, 1] = 1
    shift = functools.partial(torch.randint, -pad, pad + 1)
    theta[:, 0, 2] = (draw(shift, (n,), gen).to(dev) * 2.0 / h).to(x.dtype)
    theta[:, 1, 2] = (draw(shift, (n,), gen).to(dev) * 2.0 / h).to(x.dtype)
    del t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
