"""The genaf encoder file format (``file:PATH``): weights plus the metadata to rebuild them.

Two containers, same content:

- ``.safetensors``: tensors named ``backbone.<param>``; the metadata dict is stored as JSON
  under the header key ``genaf_encoder``.
- ``.pt``: ``{"format": "genaf-encoder", "version": 1, "meta": {...}, "state_dict": {...}}``,
  read with ``torch.load(weights_only=True)`` (nothing but tensors and plain containers).

Both are checked before anything is allocated: the header's declared sizes against the file
(:func:`~genaf.encoders.safe_load.check_safetensors`, :func:`~genaf.encoders.safe_load.load_weights_only`),
and the network the metadata describes (width, parameter count) against the limits and the file's
size (:func:`~genaf.encoders.resnet.check_backbone`), so a tiny file cannot make genaf build a huge
network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..utils import atomic_write
from .base import Encoder, encoder_from_state
from .resnet import check_backbone
from .safe_load import check_safetensors, load_weights_only

FORMAT = "genaf-encoder"
REQUIRED_META = ("arch", "mean", "std")


def save_encoder(encoder: Encoder, path: str | os.PathLike) -> None:
    """Write ``encoder`` as a genaf encoder file (atomic). The suffix picks the container."""
    path = Path(path)
    meta = dict(encoder.meta)
    meta.pop("source", None)
    state = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"genaf_encoder": json.dumps(meta)}))
    else:
        obj = {"format": FORMAT, "version": 1, "meta": meta, "state_dict": state}
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_encoder_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (meta, backbone_state) from a genaf encoder file, validating its shape."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder file {path} does not exist")
    if path.suffix == ".safetensors":
        header = check_safetensors(path, "encoder file")
        if "genaf_encoder" not in header:
            raise CheckpointError(
                f"{path} has no 'genaf_encoder' metadata: it is not a genaf encoder file "
                "(for a torchvision state dict use torchvision:ARCH:PATH)"
            )
        try:
            meta = json.loads(header["genaf_encoder"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: its 'genaf_encoder' metadata is not JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: its 'genaf_encoder' metadata is not a JSON object")
        # The network the metadata describes is checked before any weight is read.
        missing = [k for k in REQUIRED_META if k not in meta]
        if not missing:
            check_backbone(meta, f"encoder file {path}", path.stat().st_size)
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    else:
        obj = load_weights_only(path, "genaf encoder file")
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"{path} is not a genaf encoder file (expected format '{FORMAT}'; found {keys}); "
                "use solo:PATH for solo-learn checkpoints or torchvision:ARCH:PATH for torchvision weights"
            )
        meta, state = obj["meta"], obj["state_dict"]
        if not isinstance(meta, dict) or not isinstance(state, dict):
            raise CheckpointError(f"{path}: 'meta' and 'state_dict' must be dictionaries")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path} metadata lacks {missing}")
    bad = [k for k in state if not k.startswith("backbone.")]
    if bad:
        raise CheckpointError(f"{path} has tensors outside 'backbone.*': {bad[:8]}")
    return meta, {k[len("backbone.") :]: v for k, v in state.items()}


def load_encoder_file(path: str | os.PathLike) -> Encoder:
    meta, state = read_encoder_file(path)
    meta = dict(meta, source=f"file:{path}")
    check_backbone(meta, f"encoder file {path}", Path(path).stat().st_size)
    return encoder_from_state(meta, state, f"encoder file {path}")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
