"""Universal perturbations as first-class objects: saved, loaded, applied."""

from __future__ import annotations

import json
import math
import os
import re
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
# A "patch" that covers more than this share of the image is no patch: it replaces most of the
# image, so robust accuracy against it says nothing about a patch attack (real patch attacks cover
# a few per cent: AdvEncoder-PAT 3 %, the adversarial-patch literature up to ~25 %). Such a file is
# refused; craft an additive perturbation with an ε budget instead.
MAX_PATCH_FRACTION = 0.5
# ‖δ‖∞ may exceed ε by float rounding only: this absolute slack, plus the relative machine epsilon
# of the dtype δ is stored in (a float32 δ clamped to a float64 ε, or δ saved in half precision).
ABS_SLACK = 1e-6


def budget_slack(eps: float, dtype: torch.dtype) -> float:
    """How far above ``eps`` a stored ‖δ‖∞ may lie by rounding alone."""
    rel = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return ABS_SLACK + rel * abs(eps)


@dataclass
class Perturbation:
    """A universal perturbation crafted on an encoder.

    ``delta`` is (1, C, H, W) in pixel units; for ``kind="additive"`` ``apply`` returns
    ``clamp(x + clamp(δ, −ε, ε), 0, 1)``; for ``kind="patch"``, ``x·(1−mask) + clamp(δ, 0, 1)·mask``
    with ``mask`` (1, 1, H, W) in {0, 1}. ``resize`` says what happens on inputs of another size:
    "none" (the default) refuses them, "bilinear" resizes δ bilinearly (and the mask nearest).

    The budget cannot lie: ``eps`` must be a finite number in (0, 1] (for a patch exactly 1: inside
    its mask a pixel may take any value, its budget is the mask's area, at most
    ``MAX_PATCH_FRACTION`` of the image). A file whose ‖δ‖∞ exceeds its ε (beyond float rounding)
    is refused by :meth:`load` and never written by :meth:`save`; ``apply`` clamps to the ε ball
    whatever ``delta`` holds.
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
        self._check_eps()
        if self.mask is not None:
            if self.mask.dim() == 3:
                self.mask = self.mask.unsqueeze(0)
            if self.mask.dim() != 4 or self.mask.shape[:2] != (1, 1) or self.mask.shape[-2:] != self.delta.shape[-2:]:
                raise CheckpointError(
                    f"perturbation mask must be (1, 1, H, W) like delta {tuple(self.delta.shape)}, "
                    f"got {tuple(self.mask.shape)}"
                )
            frac = self.mask_fraction()
            if self.kind == "patch" and frac > MAX_PATCH_FRACTION:
                raise CheckpointError(
                    f"this 'patch' covers {100 * frac:.1f} % of the image "
                    f"(more than {100 * MAX_PATCH_FRACTION:.0f} %): "
                    "it is a full-image perturbation with budget ε = 1, not a patch; genaf refuses it "
                    "(craft an additive perturbation with an ε budget, or a patch on a small part of the image)"
                )

    def _check_eps(self) -> None:
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise CheckpointError(f"perturbation budget eps must be a number, got {eps!r}")
        self.eps = eps = float(eps)
        if not math.isfinite(eps) or not 0 < eps <= 1:
            raise CheckpointError(
                f"perturbation budget eps={eps} is outside (0, 1]; budgets are in [0,1] pixel units "
                "(8/255 = 0.0314): the file's budget is wrong, re-craft or re-save it with its real ε"
            )
        if self.kind == "patch" and eps != 1.0:
            raise CheckpointError(
                f"a patch perturbation records eps={eps:g}, but inside its mask a pixel may take any value: "
                "its ε is 1 and its budget is the mask's area; record eps=1"
            )

    def budget_excess(self) -> float:
        """How far δ lies outside its budget (0 when inside, up to float rounding): ‖δ‖∞ − ε for
        an additive perturbation, the distance outside [0, 1] for a patch."""
        d = self.delta.detach()
        if self.kind == "patch":
            over = float(torch.maximum(-d.min(), d.max() - 1).clamp_min(0))
            return over if over > budget_slack(1.0, d.dtype) else 0.0
        over = float(d.abs().max()) - self.eps
        return over if over > budget_slack(self.eps, d.dtype) else 0.0

    def check_budget(self) -> None:
        """Refuse a δ that does not fit the budget it records."""
        over = self.budget_excess()
        if over <= 0:
            return
        if self.kind == "patch":
            raise CheckpointError(
                f"patch values span [{float(self.delta.min()):.4g}, {float(self.delta.max()):.4g}], outside the pixel "
                "range [0, 1]; the file is not a patch genaf wrote"
            )
        raise CheckpointError(
            f"perturbation ‖δ‖∞ = {self.linf():.6g} exceeds its recorded budget eps = {self.eps:.6g}: the file "
            "lies about its budget; re-craft it, or record its real ε"
        )

    def mask_fraction(self) -> float:
        """Share of the image's pixels a patch covers (1.0 for an additive perturbation)."""
        if self.mask is None:
            return 1.0
        return float((self.mask != 0).float().mean())

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
            return (x + d.clamp(-self.eps, self.eps)).clamp(0, 1)
        m = self._fit(self.mask.float(), x, "nearest")
        return x * (1 - m) + d.clamp(0, 1) * m

    def linf(self) -> float:
        return float(self.delta.abs().max())

    # --- persistence: safetensors + JSON metadata, never a pickle -------------------------
    def save(self, path: str | os.PathLike) -> None:
        self._check_eps()
        self.check_budget()
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
        from ..encoders.safe_load import check_safetensors

        # the header's declared tensors against the file's size and the limits, before reading any
        try:
            check_safetensors(path, "file")
        except CheckpointError as exc:
            head = rf"^file {re.escape(str(path))}:?\s*(is not a readable safetensors file:?\s*)?"
            detail = re.sub(head, "", str(exc))
            raise CheckpointError(f"{path} is not a readable perturbation file (safetensors): {detail}") from None
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
        try:
            meta = json.loads(header["genaf_perturbation"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: the perturbation header is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: the perturbation header is not a JSON object")
        if "eps" not in meta:
            raise CheckpointError(f"{path}: the perturbation records no budget (eps); re-craft it with genaf attack")
        allowed = {f for f in cls.__dataclass_fields__ if f not in ("delta", "mask")}
        meta = {k: v for k, v in meta.items() if k in allowed}
        try:
            delta, mask = tensors["delta"], tensors.get("mask")
            if not delta.is_floating_point():
                raise CheckpointError(f"perturbation delta must hold floats, got {delta.dtype}")
            pert = cls(delta=delta, mask=mask, **meta)
            pert.check_budget()  # on δ as stored (its dtype sets the rounding slack)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed perturbation metadata ({exc})") from None
        pert.delta = pert.delta.float()
        if pert.mask is not None:
            pert.mask = pert.mask.float()
        return pert
