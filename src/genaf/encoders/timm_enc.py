"""timm models as genaf encoders (``timm:MODEL_NAME[:PATH]``).

The backbone *is* timm's model, built with ``timm.create_model(name, pretrained=False,
num_classes=0)``, so its module names are timm's (``blocks.3.attn.qkv``, ``stages.1``, ...) and
its forward returns the pooled feature (``forward_features`` then ``forward_head(pre_logits)``).

- Weights come from ``PATH``: a ``.safetensors`` file, or a ``torch.save`` file (``.pth``,
  ``.bin``, ``.pt``) read with genaf's safe reader (:mod:`genaf.encoders.safe_load`), possibly
  wrapped (``{'state_dict': ...}``, ``{'model': ...}``) or prefixed (``module.``, ``backbone.``).
  A checkpoint in the model's original layout (e.g. Meta's DINOv2 ``.pth``) is converted with
  timm's own ``checkpoint_filter_fn`` when the keys do not match as they are. The classifier
  head of a classification checkpoint is dropped (and reported); any other missing or
  unexpected key is an error.
- Without ``PATH`` the weights are timm's pretrained ones (``pretrained=True``: timm's own
  download and cache code; needs a network the first time).
- Normalisation, input size and interpolation come from the model's ``pretrained_cfg``.
- Vision Transformers are built with ``dynamic_img_size=True``: they run at any image size that
  is a multiple of their patch size, with position embeddings interpolated.
- Pooling: ``pool=cls`` (timm ``token``), ``mean`` (``avg``: mean of the patch tokens, prefix
  tokens -- class and register tokens -- excluded) or ``pooler`` (the model's own attention
  pooling, e.g. ``map``). The default is the model's own ``global_pool``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, SpecError, first_line
from .base import Encoder, add_size_guard, load_state_strict

INSTALL_HINT = "pip install 'genaf[timm]'"
# genaf pool name -> timm global_pool
POOL_TO_TIMM = {"cls": "token", "mean": "avg"}
TIMM_TO_POOL = {"token": "cls", "avg": "mean"}
POOLS = ("cls", "mean", "pooler")
STATE_PREFIXES = ("module.", "backbone.", "model.", "encoder.")

__all__ = ["build_timm_backbone", "import_timm", "load_timm_encoder"]


def import_timm():
    """``timm``, or a one-line error naming the extra to install."""
    try:
        import timm
    except ImportError as exc:
        raise SpecError(f"timm: encoders need the timm package, which is not installed; run {INSTALL_HINT}") from exc
    return timm


def _create(name: str, pretrained: bool) -> tuple[nn.Module, dict]:
    """``create_model(name, num_classes=0)``; ViTs with ``dynamic_img_size=True``. Returns the
    model and the extra keyword arguments used (recorded to rebuild it)."""
    timm = import_timm()
    if not timm.is_model(name) and not name.startswith(("hf-hub:", "hf_hub:")):
        from ..errors import did_you_mean

        base = name.split(".")[0]
        hint = did_you_mean(base, timm.list_models()) if len(base) > 2 else ""
        raise SpecError(
            f"timm has no model '{name}'{hint}; list them with python -c \"import timm; print(timm.list_models())\""
        )
    kwargs: dict[str, Any] = {"dynamic_img_size": True}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
        kwargs = {}
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except (RuntimeError, OSError) as exc:
        if pretrained:
            raise CheckpointError(
                f"timm could not fetch the pretrained weights of '{name}' ({first_line(exc)}); "
                f"without a network give a local file: timm:{name}:PATH"
            ) from exc
        raise
    return model, kwargs


def _patch_size(model: nn.Module) -> int | None:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return None
    ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
    if ps[0] != ps[1]:
        raise SpecError(f"timm model with a non-square patch {ps} is not supported")
    return int(ps[0])


def _set_pool(model: nn.Module, pool: str | None, name: str) -> str:
    """Apply the asked-for pooling; return the pooling in genaf's words."""
    current = _global_pool_str(model) or ""
    if pool is None:
        return TIMM_TO_POOL.get(current, current or "none")
    if pool not in POOLS:
        raise SpecError(f"unknown pool '{pool}' for timm:{name}; choose one of: {', '.join(POOLS)}")
    if pool == "pooler":
        if current in ("map", "prr"):
            return current
        raise SpecError(
            f"timm:{name} has no attention pooler (its global_pool is '{current}'); use pool=cls or pool=mean"
        )
    if pool == "cls" and not getattr(model, "has_class_token", False) and not hasattr(model, "cls_token"):
        raise SpecError(f"timm:{name} has no class token, so pool=cls is not possible; use pool=mean")
    want = POOL_TO_TIMM[pool]
    if want != current:
        try:
            model.reset_classifier(0, global_pool=want)
        except (AssertionError, TypeError, ValueError) as exc:
            raise SpecError(f"timm:{name} cannot pool with '{want}' ({exc}); use its default pooling") from exc
    return pool


def build_timm_backbone(meta: dict) -> nn.Module:
    """Rebuild (random weights) the timm backbone a genaf meta dict describes."""
    timm = import_timm()
    name = meta["timm_model"]
    model = timm.create_model(name, pretrained=False, num_classes=0, **(meta.get("timm_kwargs") or {}))
    if meta.get("timm_global_pool") is not None and _global_pool_str(model) != meta["timm_global_pool"]:
        model.reset_classifier(0, global_pool=meta["timm_global_pool"])
    model.feature_dim = int(meta["feature_dim"])
    add_size_guard(model, meta)
    return model


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from .tv import read_state_file

    return read_state_file(path)


def _classifier_keys(model: nn.Module, keys: list[str]) -> list[str]:
    """Keys of a classification head (pretrained_cfg's ``classifier``) that a num_classes=0 model lacks."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    heads = cfg.get("classifier") or "head"
    heads = heads if isinstance(heads, (list, tuple)) else [heads]
    return [k for k in keys if any(k == h or k.startswith(h + ".") for h in heads)]


def _match_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> tuple[dict, dict]:
    """Bring ``state`` to the model's key layout. Returns (state, report)."""
    from .safe_load import extract_state_dict

    own = model.state_dict()
    notes: list[str] = []
    if not (set(own) & set(state)):
        prefixes = [p for p in STATE_PREFIXES if any(k.startswith(p) for k in state)]
        if prefixes:
            prefix, state = extract_state_dict(state, prefixes, what)
            notes.append(f"weights taken from '{prefix}*'")
    def mismatch(st: dict) -> int:
        extra = [k for k in st if k not in own]
        return len([k for k in own if k not in st]) + len(extra) - len(_classifier_keys(model, extra))

    if mismatch(state):
        import importlib

        module = importlib.import_module(type(model).__module__)
        filt = getattr(module, "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                converted = filt(dict(state), model)
            except Exception as exc:  # timm's converters assert on layouts they do not know
                notes.append(f"timm's checkpoint_filter_fn could not convert it ({first_line(exc)})")
            else:
                if mismatch(converted) < mismatch(state):
                    state = dict(converted)
                    notes.append("converted with timm's checkpoint_filter_fn")
    head = _classifier_keys(model, [k for k in state if k not in own])
    state = {k: v for k, v in state.items() if k not in head}
    report = {"dropped_classifier": head, "notes": notes}
    return state, report


def load_timm_encoder(name: str, path: str | os.PathLike | None, pool: str | None = None) -> Encoder:
    """A timm model as a genaf :class:`Encoder` (eval mode); weights from ``path`` or timm's hub."""
    if not name:
        raise SpecError("timm spec must be timm:MODEL_NAME or timm:MODEL_NAME:PATH")
    model, kwargs = _create(name, pretrained=path is None)
    report: dict[str, Any] = {"dropped_classifier": [], "notes": []}
    if path is not None:
        path = Path(path)
        what = f"timm {name} weights {path}"
        state = _read_state(path)
        state, report = _match_state(model, state, what)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        load_state_strict(model, state, what)
        n_loaded = len(state)
    else:
        n_loaded = len(model.state_dict())
        report["notes"].append("timm pretrained weights (hub/cache)")
    pool_name = _set_pool(model, pool, name)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if "mean" not in cfg or "std" not in cfg:
        raise CheckpointError(f"timm:{name} has no mean/std in its pretrained_cfg; genaf cannot normalise its input")
    input_size = cfg.get("input_size") or (3, 224, 224)
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    meta: dict[str, Any] = {
        "arch": name,
        "library": "timm",
        "timm_model": name,
        "timm_kwargs": kwargs,
        "timm_global_pool": _global_pool_str(model),
        "pool": pool_name,
        "feature_dim": feature_dim,
        "in_chans": int(input_size[0]),
        "input_size": int(input_size[-1]),
        "fixed_input_size": bool(cfg.get("fixed_input_size", False)),
        "interpolation": cfg.get("interpolation"),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "patch_size": _patch_size(model),
        "keys": {
            "loaded": n_loaded,
            "missing": [],
            "unexpected": report["dropped_classifier"],
            "note": "; ".join(
                report["notes"] + (["classifier head dropped"] if report["dropped_classifier"] else [])
            )
            or "strict load",
        },
    }
    if meta["patch_size"] is not None:
        meta["num_prefix_tokens"] = int(getattr(model, "num_prefix_tokens", 0))
        meta["num_register_tokens"] = int(getattr(model, "num_reg_tokens", 0))
    if cfg.get("hf_hub_id") or cfg.get("url"):
        meta["pretrained_source"] = cfg.get("hf_hub_id") or cfg.get("url")
    model.feature_dim = feature_dim
    add_size_guard(model, meta)
    return Encoder(model, meta).eval()


def _global_pool_str(model: nn.Module) -> str | None:
    gp = getattr(model, "global_pool", None)
    if gp is None:  # ConvNeXt-style heads keep the pooling inside the head
        gp = getattr(getattr(model, "head", None), "global_pool", None)
    if gp is None:
        return None
    if isinstance(gp, str):
        return gp
    return str(getattr(gp, "pool_type", "")) or None
