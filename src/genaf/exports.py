"""``genaf export``: a run's fine-tuned encoder as a plain weights file another library loads.

Formats (``FORMATS``):

- ``torchvision``: a torchvision ResNet state dict (``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight``, ... without ``fc``), for a ResNet-18/34/50 with torchvision's stem
  (7x7 conv, padding 3, max-pool), width 64, 3 input channels and ImageNet normalisation: what
  ``torchvision.models.resnet18()`` computes with these weights (``fc`` set to ``nn.Identity``)
  and what genaf loads with ``torchvision:ARCH:FILE``.
- ``timm``: the backbone's own state dict for ``timm.create_model(NAME, num_classes=0)``; for a
  ``timm:`` run, and for a torchvision-stem ResNet (timm's ``resnet18/34/50`` have its layout)
  when its normalisation is timm's. Loaded with ``timm:NAME:FILE`` (plus ``?pool=`` when the run
  pooled otherwise than the model's default).
- ``safetensors``: genaf's own encoder file (weights and the metadata to rebuild them, any
  architecture), loaded with ``file:FILE``.

A format that does not fit the architecture is refused: genaf's CIFAR-stem ResNet (3x3 conv1, no
max-pool) loaded as a torchvision ResNet would compute something else. The head is genaf's own
MLP and is not exported (torchvision and timm have no place for it). The file is written
atomically; unless ``verify=False``, it is then loaded back with the spec printed and its features
compared with the run's encoder on random images (the file is removed if they differ).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, _short
from .errors import CheckpointError, ConfigError, SpecError, unknown
from .utils import atomic_write

FORMATS = ("torchvision", "timm", "safetensors")
# the container of a torchvision/timm export, by suffix: safetensors, or torch.save of a tensor dict
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
HEAD_NOTE = {
    "torchvision": "the head (genaf's own MLP) is not exported: a torchvision backbone state dict has no place for it",
    "timm": "the head (genaf's own MLP) is not exported: a timm backbone state dict has no place for it",
    "safetensors": "the head (genaf's own MLP) is not exported: an encoder file holds the encoder only "
    "(genaf.load_model(RUN) gives the whole classifier)",
}
# features of the file loaded back may differ from the run's by float rounding only
VERIFY_RTOL = 1e-5

__all__ = ["FORMATS", "export"]


def export(run: str | os.PathLike, format: str, out: str | os.PathLike, verify: bool = True) -> dict:
    """Write the fine-tuned encoder of run directory ``run`` to ``out`` in ``format`` (see the
    module docstring). Returns ``{out, format, arch, load_with, tensors, parameters, verified,
    max_abs_diff, head}``; ``load_with`` is the genaf encoder spec that loads the file."""
    if format not in FORMATS:
        raise unknown("export format", format, FORMATS)
    from .models import load_model

    run, out = Path(run), Path(out)
    _check_out(run, out, format)
    model = load_model(run, "cpu")
    enc = model.encoder
    if format == "torchvision":
        arch = torchvision_arch(enc.meta)
        state = _backbone_state(enc)
        _check_layout(state, _torchvision_module(arch), f"torchvision {arch}")
        spec = f"torchvision:{arch}:{out}"
        _write_state(state, out, format, arch)
    elif format == "timm":
        arch, pool = timm_target(enc.meta)
        state = _backbone_state(enc)
        _check_layout(state, _timm_module(arch), f"timm {arch}")
        spec = f"timm:{arch}:{out}" + (f"?pool={pool}" if pool else "")
        _write_state(state, out, format, arch)
    else:
        from .encoders.files import save_encoder

        arch = enc.arch
        state = _backbone_state(enc)
        tagged = Encoder(enc.backbone, {**enc.meta, "exported_from": _origin(run)})
        save_encoder(tagged, out)
        spec = f"file:{out}"
    result = {
        "out": str(out),
        "format": format,
        "arch": arch,
        "load_with": spec,
        "tensors": len(state),
        "parameters": sum(p.numel() for p in enc.backbone.parameters()),
        "verified": False,
        "max_abs_diff": None,
        "head": HEAD_NOTE[format],
    }
    if verify:
        result["max_abs_diff"] = _verify(enc, spec, out)
        result["verified"] = True
    return result


# ------------------------------------------------------------------ which formats fit


def torchvision_arch(meta: dict) -> str:
    """The torchvision ResNet an encoder is, or a one-line SpecError saying why it is none."""
    from .encoders.resnet import ARCHS

    arch = str(meta.get("arch"))
    library = meta.get("library", "genaf")
    if library != "genaf":
        other = "--format timm (or safetensors)" if library == "timm" else "--format safetensors"
        raise SpecError(
            f"the run's encoder is a {library} model ({arch}), not a torchvision ResNet; export it with {other}"
        )
    if arch not in ARCHS:
        raise SpecError(
            f"the run's encoder is a {arch}, not a torchvision ResNet ({', '.join(ARCHS)}); "
            "export it with --format safetensors (loads with file:OUT)"
        )
    problem = _stem_problem(meta)
    if problem:
        raise SpecError(
            f"the run's encoder is {problem}, so it is not a torchvision {arch} (torchvision would compute "
            "other features); export it with --format safetensors (loads with file:OUT)"
        )
    if not _same_stats(meta, IMAGENET_MEAN, IMAGENET_STD):
        raise SpecError(
            f"the run's encoder normalises with mean {_fmt(meta['mean'])}, std {_fmt(meta['std'])}, but "
            f"torchvision:{arch}:PATH uses ImageNet's {_fmt(IMAGENET_MEAN)}, {_fmt(IMAGENET_STD)} (it would compute "
            "other features); export it with --format safetensors (loads with file:OUT)"
        )
    return arch


def timm_target(meta: dict) -> tuple[str, str | None]:
    """``(timm model name, genaf pool option or None)`` for an encoder timm can load, or a
    one-line SpecError saying why timm cannot."""
    library = meta.get("library", "genaf")
    arch = str(meta.get("arch"))
    if library == "timm":
        name = meta["timm_model"]
        default = _timm_default_pool(name)
        if meta.get("timm_global_pool") == default:
            return name, None
        from .encoders.timm_enc import POOLS, TIMM_TO_POOL

        gp = meta.get("timm_global_pool")
        pool = TIMM_TO_POOL.get(gp, "pooler" if gp in ("map", "prr") else None)
        if pool not in POOLS:
            raise SpecError(
                f"the run's timm encoder {name} pools with '{gp}', which timm:NAME:PATH?pool= cannot ask for; "
                "export it with --format safetensors (loads with file:OUT)"
            )
        return name, pool
    if library != "genaf":
        raise SpecError(
            f"the run's encoder is a {library} model ({arch}), not a timm model; export it with --format safetensors"
        )
    from .encoders.resnet import ARCHS

    if arch not in ARCHS:
        raise SpecError(
            f"the run's encoder is genaf's own {arch}, not a timm model; export it with --format safetensors "
            "(loads with file:OUT)"
        )
    problem = _stem_problem(meta)
    if problem:
        raise SpecError(
            f"the run's encoder is {problem}, unlike timm's {arch} (timm would compute other features); "
            "export it with --format safetensors (loads with file:OUT)"
        )
    cfg = getattr(_timm_module(arch), "pretrained_cfg", {}) or {}
    if not _same_stats(meta, cfg.get("mean", ()), cfg.get("std", ())):
        raise SpecError(
            f"the run's encoder normalises with mean {_fmt(meta['mean'])}, std {_fmt(meta['std'])}, but "
            f"timm:{arch}:PATH uses {_fmt(cfg.get('mean', ()))}, {_fmt(cfg.get('std', ()))} (it would compute "
            "other features); export it with --format safetensors (loads with file:OUT)"
        )
    return arch, None


def _stem_problem(meta: dict) -> str | None:
    """What keeps a genaf ResNet from being torchvision's (and timm's) same-named ResNet."""
    if meta.get("stem", "imagenet") != "imagenet":
        return f"genaf's CIFAR-stem {meta.get('arch')} (3x3 conv1, stride 1, no max-pool)"
    if meta.get("stem_padding") is not None and int(meta["stem_padding"]) != 3:
        return f"a ResNet whose 7x7 conv1 has padding {meta.get('stem_padding')} (torchvision's has 3)"
    if int(meta.get("width", 64)) != 64:
        return f"a ResNet of width {meta.get('width')} (torchvision's and timm's are 64 wide)"
    if int(meta.get("in_chans", 3)) != 3:
        return f"a ResNet with {meta.get('in_chans')} input channels (torchvision's and timm's take 3)"
    return None


def _same_stats(meta: dict, mean, std) -> bool:
    a = [float(v) for v in (*meta.get("mean", ()), *meta.get("std", ()))]
    b = [float(v) for v in (*mean, *std)]
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(a, b))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


# ------------------------------------------------------------------ the target libraries' modules


def _torchvision_module(arch: str) -> nn.Module:
    """torchvision's ``arch`` with ``fc`` replaced by ``nn.Identity`` (on the meta device: no memory)."""
    import torchvision

    with torch.device("meta"):
        module = getattr(torchvision.models, arch)()
    module.fc = nn.Identity()
    return module


def _timm_module(name: str) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` on the meta device."""
    from .encoders.timm_enc import import_timm

    timm = import_timm()
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


def _timm_default_pool(name: str) -> str | None:
    from .encoders.timm_enc import _global_pool_str

    return _global_pool_str(_timm_module(name))


def _check_layout(state: dict[str, torch.Tensor], target: nn.Module, what: str) -> None:
    """The exported keys and shapes are exactly the target library's module's."""
    own = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {own[k]}" for k in own if k in state and tuple(state[k].shape) != own[k]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{name} ({len(items)}): {_short(items)}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes))
            if items
        ]
        raise SpecError(
            f"the run's encoder does not have the layout of {what} ({'; '.join(parts)}); "
            "export it with --format safetensors (loads with file:OUT)"
        )


# ------------------------------------------------------------------ writing and checking


def _check_out(run: Path, out: Path, format: str) -> None:
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the file to write, e.g. {out / 'encoder.safetensors'}")
    suffix = out.suffix.lower()
    if format == "safetensors":
        if suffix not in (".safetensors", ".pt", ".pth"):
            raise ConfigError(
                f"--out {out}: a genaf encoder file is .safetensors (or genaf's .pt container); "
                f"name it e.g. {out.with_suffix('.safetensors')}"
            )
    elif suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ConfigError(
            f"--out {out}: name the file .safetensors (a safetensors state dict) or .pth (torch.save of a plain "
            f"tensor dict), e.g. {out.with_suffix('.safetensors')}"
        )
    if out.exists() and run.is_dir() and out.resolve().parent == run.resolve():
        raise ConfigError(f"--out {out} is a file of the run itself; write the export elsewhere")


def _backbone_state(enc: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in enc.backbone.state_dict().items()}


def _write_state(state: dict[str, torch.Tensor], out: Path, format: str, arch: str) -> None:
    if out.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        header = {"format": "pt", "genaf_export": json.dumps({"format": format, "arch": arch})}
        atomic_write(out, lambda tmp: save_file(state, tmp, metadata=header))
    else:
        atomic_write(out, lambda tmp: torch.save(state, tmp))


def _origin(run: Path) -> dict:
    """The run an exported genaf encoder file comes from (recorded in its metadata)."""
    origin: dict = {"run": str(run)}
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        from .config import safe_yaml

        try:
            cfg = safe_yaml(cfg_path.read_bytes(), str(cfg_path))
        except ConfigError:
            cfg = None
        if isinstance(cfg, dict):
            origin.update({k: cfg[k] for k in ("method", "dataset", "encoder", "seed") if k in cfg})
    return origin


def _check_size(meta: dict) -> int:
    """The image side the check runs at: the encoder's own for patch models, at most 64 otherwise."""
    size = int(meta.get("input_size") or 32)
    if meta.get("patch_size") or meta.get("fixed_input_size"):
        return size
    return min(size, 64)


def _verify(enc: Encoder, spec: str, out: Path) -> float:
    """Load ``out`` with ``spec`` and compare its features with ``enc``'s on random images;
    the file is removed when they differ (or it does not load)."""
    from .encoders import load_encoder

    side = _check_size(enc.meta)
    x = torch.rand(2, int(enc.meta.get("in_chans", 3)), side, side, generator=torch.Generator().manual_seed(0))
    try:
        loaded = load_encoder(spec)
        with torch.no_grad():
            want, got = enc.eval()(x), loaded.eval()(x)
    except Exception as exc:
        out.unlink(missing_ok=True)
        raise CheckpointError(
            f"the exported file does not load back with {spec} ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            f"it was removed (skip this check with --no-verify)"
        ) from exc
    diff = float((got - want).abs().max()) if got.shape == want.shape else math.inf
    if not diff <= VERIFY_RTOL * (1.0 + float(want.abs().max())):
        out.unlink(missing_ok=True)
        raise CheckpointError(
            f"{spec} computes other features than the run's encoder (max |diff| {diff:.3g}); "
            f"the file was removed; export with --format safetensors instead"
        )
    return diff
