"""Universal perturbations as first-class objects: saved, loaded, applied."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, DataError
from ..utils import atomic_write

KINDS = ("additive", "patch")
RESIZE = ("none", "bilinear")


@dataclass
class Perturbation:
    """A universal perturbation crafted on an encoder.

    ``delta`` is (1, C, H, W) in pixel units; for ``kind="additive"`` ``apply`` returns
    ``clamp(x + δ, 0, 1)``; for ``kind="patch"``, ``x·(1−mask) + δ·mask`` with ``mask``
    (1, 1, H, W) in {0, 1}. ``resize`` says what happens on inputs of another size: "none"
    (the default) refuses them, "bilinear" resizes δ bilinearly (and the mask nearest).
    """

    delta: torch.Tensor
    kind: str = "additive"
    eps: float = 0.0
    norm: str = "linf"
    attack: str = ""
    config: dict = field(default_factory=dict)
    encoder_hash: str = ""
    encoder_source: str = ""
    surrogate: str = ""
    seed: int = 0
    mask: torch.Tensor | None = None
    resize: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"perturbation kind '{self.kind}' is not one of {KINDS}")
        if self.delta.dim() == 3:
            self.delta = self.delta.unsqueeze(0)
        if self.delta.dim() != 4 or self.delta.shape[0] != 1:
            raise CheckpointError(f"perturbation delta must be (1, C, H, W), got {tuple(self.delta.shape)}")
        if self.kind == "patch" and self.mask is None:
            raise CheckpointError("a patch perturbation needs a mask")
        if not bool(torch.isfinite(self.delta).all()):
            raise CheckpointError("perturbation delta has NaN or inf values")
        if self.mask is not None and not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise CheckpointError("perturbation mask must hold only 0 and 1")
        if self.resize not in RESIZE:
            raise CheckpointError(f"perturbation resize policy '{self.resize}' is not one of {RESIZE}")

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.delta.shape[-2]), int(self.delta.shape[-1])

    def _fit(self, t: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
        t = t.to(device=x.device, dtype=x.dtype)
        if tuple(t.shape[-2:]) != tuple(x.shape[-2:]):
            if self.resize == "none":
                h, w = self.resolution
                raise DataError(
                    f"perturbation is {h}x{w} but the images are {x.shape[-2]}x{x.shape[-1]}; craft it at the "
                    "images' size, or allow resizing (genaf evaluate --resize bilinear)"
                )
            kw = {"align_corners": False} if mode == "bilinear" else {}
            t = F.interpolate(t, size=tuple(x.shape[-2:]), mode=mode, **kw)
        if t.shape[1] != x.shape[1]:
            if t.shape[1] == 1:
                t = t.expand(-1, x.shape[1], -1, -1)
            else:
                raise DataError(
                    f"perturbation has {t.shape[1]} channels but the images have {x.shape[1]}: it was crafted on "
                    "other images (RGB vs grayscale); craft it on images like these"
                )
        return t

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Perturb a [0,1] batch (N, C, H, W); the result stays in [0,1]."""
        d = self._fit(self.delta, x, self.resize)
        if self.kind == "additive":
            if self.eps > 0:
                d = d.clamp(-self.eps, self.eps)
            return (x + d).clamp(0, 1)
        m = self._fit(self.mask.float(), x, "nearest")
        return x * (1 - m) + d.clamp(0, 1) * m

    def linf(self) -> float:
        return float(self.delta.abs().max())

    # --- persistence: safetensors + JSON metadata, never a pickle -------------------------
    def save(self, path: str | os.PathLike) -> None:
        meta = {k: v for k, v in asdict(self).items() if k not in ("delta", "mask")}
        tensors = {"delta": self.delta.detach().cpu().float().contiguous()}
        if self.mask is not None:
            tensors["mask"] = self.mask.detach().cpu().float().contiguous()
        header = {"genaf_perturbation": json.dumps(meta, default=str)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Perturbation:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"perturbation file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable perturbation file (safetensors): {exc}") from exc
        if "genaf_perturbation" not in header or "delta" not in tensors:
            raise CheckpointError(
                f"{path} is a safetensors file but not a genaf perturbation (no 'genaf_perturbation' header)"
            )
        meta = json.loads(header["genaf_perturbation"])
        allowed = {f for f in cls.__dataclass_fields__ if f not in ("delta", "mask")}
        meta = {k: v for k, v in meta.items() if k in allowed}
        return cls(delta=tensors["delta"], mask=tensors.get("mask"), **meta)
