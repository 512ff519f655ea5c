"""Heads and the downstream model ``F = h ∘ f ∘ N`` on [0,1] images; saving and loading runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .encoders.base import Encoder, Normalize, build_any_backbone, load_state_strict
from .errors import CheckpointError, SpecError
from .utils import atomic_write, write_json

HEADS = ("mlp", "linear")


def make_head(kind: str, dim: int, num_classes: int, dropout: float = 0.2) -> nn.Module:
    """``mlp``: d→d→d→C with ReLU and dropout (the reference head); ``linear``: d→C."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(dim, dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim, dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim, num_classes),
        )
    from .errors import unknown

    raise unknown("head", kind, HEADS)


class DownstreamModel(nn.Module):
    """A classifier on [0,1] NCHW images: ``head(encoder(x))``; returns logits (N, C)."""

    def __init__(self, encoder: Encoder, num_classes: int, head: str = "mlp", dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2:
            raise SpecError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.head = make_head(head, encoder.feature_dim, num_classes, dropout)
        self.config = {"head": head, "num_classes": int(num_classes), "dropout": float(dropout)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def weight_layers(self) -> dict[str, nn.Module]:
        """Every Conv2d/Linear module by its full name (the units of stage-2 scoring)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def spec(self) -> dict:
        """Everything needed to rebuild this module (weights excluded)."""
        meta = {k: v for k, v in self.encoder.meta.items()}
        return {"format": "genaf-model", "version": 1, "encoder": meta, **self.config}


def save_model(model: DownstreamModel, run_dir: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``model.json`` (atomically) into ``run_dir``."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_json(run_dir / "model.json", model.spec())


def build_model(spec: dict, on_disk: int | None = None, what: str = "model.json") -> DownstreamModel:
    """Rebuild the module ``spec`` describes; its size is checked first (see ``check_model_spec``)."""
    check_model_spec(spec, what, on_disk)
    enc_meta = spec["encoder"]
    enc = Encoder(build_any_backbone(enc_meta), enc_meta)
    return DownstreamModel(enc, spec["num_classes"], spec.get("head", "mlp"), spec.get("dropout", 0.2))


def check_model_spec(spec: dict, what: str, on_disk: int | None = None) -> None:
    """Check a model description before building it: its class count against ``max_num_classes``,
    the encoder's width against ``max_width``, and the whole network (built on the meta device,
    which costs no memory) against the weight file's size (``on_disk`` bytes)."""
    from . import limits
    from .encoders.resnet import check_backbone, check_module_bytes

    if not isinstance(spec, dict) or spec.get("format") != "genaf-model":
        raise CheckpointError(f"{what} is not a genaf model description (format != 'genaf-model')")
    n = spec.get("num_classes")
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        limits.check("max_num_classes", n, f"{what}: num_classes")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 2:
        raise CheckpointError(f"{what}: num_classes must be a whole number >= 2, got {n!r}")
    spec["num_classes"] = int(n)
    if not isinstance(spec.get("encoder"), dict):
        raise CheckpointError(f"{what}: 'encoder' must be an object describing the encoder")
    check_backbone(spec["encoder"], what, on_disk)
    enc_meta = spec["encoder"]
    with torch.device("meta"):
        enc = Encoder(build_any_backbone(enc_meta), enc_meta)
        model = DownstreamModel(enc, spec["num_classes"], spec.get("head", "mlp"), spec.get("dropout", 0.2))
    check_module_bytes(model, what, on_disk)


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DownstreamModel:
    """Rebuild a fine-tuned model from a run directory; returns it in eval mode."""
    run_dir = Path(run_dir)
    mj, ms = run_dir / "model.json", run_dir / "model.safetensors"
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not mj.is_file() or not ms.is_file():
        raise CheckpointError(
            f"{run_dir} holds no finished model (model.json and model.safetensors); "
            "did the run finish? resume it with --resume"
        )
    from .encoders.safe_load import check_safetensors

    try:
        spec = json.loads(mj.read_text())
    except Exception as exc:
        raise CheckpointError(f"cannot read the model in {run_dir}: {exc}") from exc
    check_safetensors(ms, "model weights")
    model = build_model(spec, ms.stat().st_size, str(mj))  # checked before anything is allocated
    try:
        state = load_file(str(ms))
    except Exception as exc:
        raise CheckpointError(f"cannot read the model in {run_dir}: {exc}") from exc
    load_state_strict(model, state, f"{ms}")
    return model.to(device).eval()


__all__ = ["DownstreamModel", "Normalize", "make_head", "save_model", "load_model", "build_model"]
