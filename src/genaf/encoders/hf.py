"""Hugging Face vision backbones as genaf encoders (``hf:DIR`` or ``hf:ORG/NAME``).

``DIR`` is a local model folder: ``config.json``, ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) and ``preprocessor_config.json``. The model is loaded with the
library's own ``from_pretrained(DIR, local_files_only=True, trust_remote_code=False,
use_safetensors=True)``; a config that asks for remote code (``auto_map``) is refused. A name that
is not a folder is a hub id: the same call without ``local_files_only`` (the library's own
cache/hub code, needs a network the first time).

Supported model types (the backbone is the library's model, so module names are the library's):
``dinov2``, ``dinov2_with_registers``, ``dinov3_vit``, ``vit`` (``ViTModel``), ``clip`` (the
vision tower of a full CLIP folder, as ``CLIPVisionModel``) and ``clip_vision_model``.

Pooling (``pool=``): ``cls`` (the class token of ``last_hidden_state``), ``mean`` (mean of the
patch tokens of ``last_hidden_state``; class and register tokens excluded) or ``pooler``
(``pooler_output``: for CLIP the post-layernormed class token). Defaults: what the model's
authors use -- ``cls`` for DINOv2/DINOv3/ViT, ``pooler`` for CLIP.

Normalisation (``image_mean``/``image_std``), input size and interpolation come from
``preprocessor_config.json``; a folder without it is refused. Images of any size that is a
multiple of the patch size are accepted (``interpolate_pos_encoding=True``; DINOv2 always
interpolates, DINOv3 uses rotary position embeddings).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from .base import Encoder, add_size_guard

INSTALL_HINT = "pip install 'genaf[hf]'"
DEFAULT_POOL = {
    "dinov2": "cls",
    "dinov2_with_registers": "cls",
    "dinov3_vit": "cls",
    "vit": "cls",
    "clip": "pooler",
    "clip_vision_model": "pooler",
}
POOLS = ("cls", "mean", "pooler")
MAX_JSON_BYTES = 1 << 20
# PIL resampling codes used by preprocessor configs
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

__all__ = ["HFBackbone", "build_hf_backbone", "import_transformers", "load_hf_encoder"]


def import_transformers():
    """``transformers``, or a one-line error naming the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(
            f"hf: encoders need the transformers package, which is not installed; run {INSTALL_HINT}"
        ) from exc
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """Silence the library's load report and progress bars (genaf reports the keys itself)."""
    log = transformers.utils.logging
    level = log.get_verbosity()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        log.enable_progress_bar()


class HFBackbone(nn.Module):
    """A Hugging Face vision model whose forward returns the pooled feature.

    The model's own submodules are this module's children (``embeddings``, ``encoder`` /
    ``layers``, ...), so module and state-dict names are the library's; the model object itself
    is kept outside the module tree and only used for its forward.
    """

    def __init__(self, model: nn.Module, pool: str, num_prefix_tokens: int, feature_dim: int) -> None:
        super().__init__()
        own = list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False))
        if own:
            raise SpecError(
                f"{type(model).__name__} keeps tensors outside its submodules ({own[0][0]}); not supported by hf:"
            )
        object.__setattr__(self, "_hf", model)
        for name, child in model.named_children():
            if child is not None:
                self.add_module(name, child)
        self.pool = pool
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.feature_dim = int(feature_dim)
        self.interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    @property
    def hf_model(self) -> nn.Module:
        return self._hf

    def train(self, mode: bool = True) -> HFBackbone:
        super().train(mode)
        self._hf.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self._hf(pixel_values=x, **kwargs)
        if self.pool == "pooler":
            return out.pooler_output
        h = out.last_hidden_state
        if self.pool == "cls":
            return h[:, 0]
        return h[:, self.num_prefix_tokens :].mean(dim=1)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: {path.name} is missing from {path.parent}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what}: {path} is {size} bytes, more than a model config has ({MAX_JSON_BYTES})")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what}: {path} is not readable JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path} should hold a JSON object")
    return obj


def _model_class(transformers, model_type: str):
    if model_type in ("clip", "clip_vision_model"):
        return transformers.CLIPVisionModel
    return transformers.AutoModel


def _check_config(raw: dict, what: str) -> str:
    if "auto_map" in raw:
        raise SpecError(
            f"{what}: config.json asks for the model's own Python code (auto_map); genaf never runs remote code "
            "(trust_remote_code=False); use a model the transformers library implements"
        )
    model_type = raw.get("model_type")
    if model_type not in DEFAULT_POOL:
        raise SpecError(
            f"{what}: model_type '{model_type}' is not a supported vision backbone; supported: "
            + ", ".join(DEFAULT_POOL)
        )
    return str(model_type)


def _check_size(config, what: str) -> None:
    """Refuse a config that claims a model far larger than a real one, before allocating it."""
    from .. import limits

    h = int(getattr(config, "hidden_size", 0) or 0)
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    i = int(getattr(config, "intermediate_size", 0) or 4 * h)
    est = 4 * n * (4 * h * h + 2 * h * i)
    limits.check("max_file_bytes", est, f"{what}: config.json (estimated weight bytes)")


def _resolve(ref: str, what: str) -> tuple[Path | str, bool]:
    """(where, local): a local folder, or a hub id for the library's own cache/hub code."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p, True
    if p.exists():
        raise SpecError(f"{what}: {ref} is a file; hf: takes a model folder (config.json + model.safetensors)")
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or (os.sep != "/" and os.sep in ref)
    if looks_like_path or not ref:
        raise SpecError(f"{what}: folder {ref} does not exist (hf:DIR wants config.json + model.safetensors in DIR)")
    return ref, False


def load_hf_encoder(ref: str, pool: str | None = None) -> Encoder:
    """A Hugging Face vision backbone as a genaf :class:`Encoder` (eval mode)."""
    transformers = import_transformers()
    what = f"hf:{ref}"
    where, local = _resolve(ref, what)
    if local:
        where = Path(where)
        raw = _read_json(where / "config.json", what)
        model_type = _check_config(raw, what)
        if not (where / "model.safetensors").is_file() and not (where / "model.safetensors.index.json").is_file():
            found = ", ".join(sorted(p.name for p in where.iterdir())[:8]) or "nothing"
            raise CheckpointError(
                f"{what}: no model.safetensors in {where} (found: {found}); genaf reads Hugging Face weights only "
                "as safetensors"
            )
        prep = _read_json(where / "preprocessor_config.json", what)
    else:
        prep = None
    load_kw: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True, "local_files_only": local}
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(str(where), **load_kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: cannot read the model config ({_first_line(exc)})") from exc
    if not local:
        model_type = _check_config(config.to_dict(), what)
        try:
            from transformers.utils import cached_file

            prep_file = cached_file(str(where), "preprocessor_config.json")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{what}: cannot fetch preprocessor_config.json ({_first_line(exc)})") from exc
        prep = _read_json(Path(prep_file), what)
    vision_config = config.vision_config if model_type == "clip" else config
    _check_size(vision_config, what)
    cls = _model_class(transformers, model_type)
    try:
        with _quiet(transformers):
            kw = {**load_kw, **_dtype_kw(transformers)}
            model, info = cls.from_pretrained(str(where), output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what}: the library could not load the model ({_first_line(exc)})") from exc
    model = model.float()  # genaf trains and attacks in float32 whatever the checkpoint's dtype
    pool = _choose_pool(pool, model_type, model, what)
    dropped_pooler = False
    if pool != "pooler" and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None  # unused: its weights are neither loaded nor trained
        dropped_pooler = True
    missing = sorted(k for k in info.get("missing_keys", ()) if not (dropped_pooler and k.startswith("pooler.")))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        from .base import _short

        parts = [f"missing keys ({len(missing)}): {_short(missing)}"] if missing else []
        parts += [f"wrong shapes ({len(mismatched)}): {_short(mismatched)}"] if mismatched else []
        raise CheckpointError(f"{what}: the weights do not match the model: " + "; ".join(parts))
    unexpected = sorted(info.get("unexpected_keys", ()))
    meta = _meta(model, vision_config, model_type, pool, prep, what)
    meta["hf_drop_pooler"] = dropped_pooler
    meta["keys"] = {
        "loaded": len(model.state_dict()),
        "missing": [],
        "unexpected": unexpected,
        "note": ("unexpected keys (other towers/heads) not used; " if unexpected else "")
        + ("pooler not used (dropped); " if dropped_pooler else "")
        + "loaded with the library's from_pretrained",
    }
    meta["pretrained_source"] = str(where) if local else f"huggingface.co/{ref}"
    backbone = HFBackbone(model, pool, meta["num_prefix_tokens"], meta["feature_dim"])
    add_size_guard(backbone, meta)
    return Encoder(backbone, meta).eval()


def _dtype_kw(transformers) -> dict:
    """float32 weights: ``dtype`` in transformers >= 5 (whose default is the checkpoint's dtype),
    ``torch_dtype`` before."""
    major = int(str(transformers.__version__).split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def _choose_pool(pool: str | None, model_type: str, model: nn.Module, what: str) -> str:
    if pool is None:
        return DEFAULT_POOL[model_type]
    if pool not in POOLS:
        raise SpecError(f"unknown pool '{pool}' for {what}; choose one of: {', '.join(POOLS)}")
    if pool == "pooler" and model_type in ("vit",) and getattr(model, "pooler", None) is None:
        raise SpecError(f"{what} has no pooler; use pool=cls or pool=mean")
    return pool


def _meta(model: nn.Module, config, model_type: str, pool: str, prep: dict, what: str) -> dict:
    mean, std = prep.get("image_mean"), prep.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and mean):
        raise CheckpointError(f"{what}: preprocessor_config.json has no image_mean/image_std lists")
    patch = config.patch_size
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    size = _prep_size(prep) or int(config.image_size)
    n_reg = int(getattr(config, "num_register_tokens", 0) or 0)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    if model_type == "clip":
        arch = "CLIPVisionModel"
    return {
        "arch": arch,
        "library": "hf",
        "hf_model_type": config.model_type,
        "hf_config": config.to_dict(),
        "pool": pool,
        "feature_dim": int(config.hidden_size),
        "in_chans": int(getattr(config, "num_channels", 3)),
        "input_size": int(size),
        "native_size": int(config.image_size),
        "interpolation": RESAMPLE.get(prep.get("resample"), prep.get("resample")),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "patch_size": patch,
        "num_prefix_tokens": 1 + n_reg,
        "num_register_tokens": n_reg,
    }


def _prep_size(prep: dict) -> int | None:
    for key in ("crop_size", "size"):
        v = prep.get(key)
        if isinstance(v, int):
            return v
        if isinstance(v, dict):
            for k in ("height", "shortest_edge"):
                if isinstance(v.get(k), int):
                    return v[k]
    return None


def build_hf_backbone(meta: dict) -> nn.Module:
    """Rebuild (random weights) the Hugging Face backbone a genaf meta dict describes."""
    transformers = import_transformers()
    cfg = dict(meta["hf_config"])
    model_type = cfg.pop("model_type", meta.get("hf_model_type"))
    config_cls = transformers.CONFIG_MAPPING[model_type]
    config = config_cls.from_dict(cfg)
    cls = _model_class(transformers, model_type)
    with _quiet(transformers):
        model = cls(config) if cls is not transformers.AutoModel else cls.from_config(config, trust_remote_code=False)
    if meta.get("hf_drop_pooler"):
        model.pooler = None
    backbone = HFBackbone(model, meta["pool"], meta["num_prefix_tokens"], meta["feature_dim"])
    add_size_guard(backbone, meta)
    return backbone


def _first_line(exc: BaseException) -> str:
    from ..errors import first_line

    return first_line(exc)
