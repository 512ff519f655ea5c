"""Pictures of perturbations (amplified to be visible) and of perturbed images, as PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .attacks.perturbation import Perturbation
from .data import ImageSet


def _to_png(t: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Write a (C, H, W) [0,1] tensor as a PNG, upscaled ``scale``× (nearest)."""
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr if arr.shape[2] == 3 else arr[:, :, 0])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_perturbation_images(pert: Perturbation, images: ImageSet, out: str | Path) -> list[Path]:
    """``<out>.delta.png`` (δ mapped from [−ε, ε] to [0, 1]) and ``<out>.examples.png``
    (top row clean images, bottom row perturbed). Returns the written paths."""
    out = Path(out)
    d = pert.delta[0].float()
    eps = pert.eps or float(d.abs().max()) or 1.0
    p1 = out.with_suffix(".delta.png")
    _to_png((d / eps + 1) / 2, p1, scale=8)
    x = images.float_images()[:8]
    xa = pert.apply(x)
    grid = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(xa), dim=2)], dim=1)
    p2 = out.with_suffix(".examples.png")
    _to_png(grid, p2, scale=4)
    return [p1, p2]
