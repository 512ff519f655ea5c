"""Loading public pre-trained encoders: ``genaf.load_encoder(spec) -> Encoder``.

Specs:
    ``solo:PATH``                 a solo-learn Lightning checkpoint (``args.json`` beside it is read)
    ``torchvision:ARCH:PATH``     a torchvision classification model's state dict (``fc`` dropped)
    ``file:PATH``                 a genaf encoder file (``.pt`` or ``.safetensors``)
    ``demo``                      the project's small Fashion-MNIST encoder (offline)
    ``random:demo``               the demo architecture with random weights (a control)
    ``demo-vit``                  the project's small Fashion-MNIST ViT (vit-tiny, SimCLR; offline)
    ``demo-vit-mix``              the same ViT pre-trained on Fashion-MNIST + rendered digits (offline)
    ``timm:MODEL_NAME[:PATH]``    a timm model; weights from PATH (.safetensors/.pth/.bin), else timm's hub
    ``hf:DIR`` / ``hf:ORG/NAME``  a Hugging Face vision backbone folder (or hub id)

Options follow a ``?``: ``timm:vit_small_patch14_dinov2.lvd142m:w.safetensors?pool=mean``
(``pool=cls|mean|pooler`` for timm: and hf:). See docs/ENCODERS.md.

Loading is strict and never unpickles anything beyond tensors and plain containers. Every file an
encoder is read from is recorded with its sha256 in ``encoder.source_files`` (not in ``meta``: a
file written from an encoder is another file).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import SpecError, unknown
from .base import DATASET_STATS, Encoder, Normalize, encoder_from_state, load_state_strict
from .demo import DEMO_META, demo_encoder, demo_vit_encoder, demo_vit_mix_encoder, random_encoder
from .files import load_encoder_file, read_encoder_file, save_encoder

SCHEMES = ("solo", "torchvision", "file", "demo", "demo-vit", "demo-vit-mix", "random", "timm", "hf")
# spec options (after '?'), and the schemes that take each
SPEC_OPTIONS = {"pool": ("timm", "hf")}
_OPTIONS_RE = re.compile(r"^[a-z_]+=[^&?=]*(&[a-z_]+=[^&?=]*)*$")

__all__ = [
    "DATASET_STATS",
    "DEMO_META",
    "Encoder",
    "Normalize",
    "encoder_from_state",
    "load_encoder",
    "load_state_strict",
    "file_sha256",
    "spec_files",
    "split_spec_options",
    "read_encoder_file",
    "save_encoder",
]


def split_spec_options(spec: str) -> tuple[str, dict[str, str]]:
    """``'timm:NAME:PATH?pool=mean'`` -> ``('timm:NAME:PATH', {'pool': 'mean'})``."""
    base, sep, tail = spec.rpartition("?")
    if not sep or not _OPTIONS_RE.match(tail):
        return spec, {}
    opts = dict(item.split("=", 1) for item in tail.split("&"))
    scheme = base.partition(":")[0]
    for key in opts:
        if key not in SPEC_OPTIONS:
            raise unknown("encoder option", key, SPEC_OPTIONS)
        if scheme not in SPEC_OPTIONS[key]:
            raise SpecError(
                f"encoder option '{key}' applies to {' and '.join(s + ':' for s in SPEC_OPTIONS[key])} specs, "
                f"not to '{base}'; remove '?{tail}'"
            )
    return base, opts


def load_encoder(spec: str) -> Encoder:
    """Load an encoder from a spec string (see module docstring). Returns it in eval mode."""
    if not isinstance(spec, str) or not spec:
        raise SpecError("encoder spec must be a non-empty string such as 'demo', 'solo:PATH' or 'file:PATH'")
    base, opts = split_spec_options(spec)
    scheme, _, rest = base.partition(":")
    if scheme == "demo" and not rest:
        enc = demo_encoder()
    elif scheme == "demo-vit" and not rest:
        enc = demo_vit_encoder()
    elif scheme == "demo-vit-mix" and not rest:
        enc = demo_vit_mix_encoder()
    elif scheme == "random":
        enc = random_encoder(rest or "demo")
    elif scheme == "file" and rest:
        enc = load_encoder_file(rest)
    elif scheme == "solo" and rest:
        from .solo import load_solo_encoder

        enc = load_solo_encoder(rest)
    elif scheme == "torchvision" and rest:
        arch, sep, path = rest.partition(":")
        if not sep or not path:
            raise SpecError(f"torchvision spec must be torchvision:ARCH:PATH, got '{spec}'")
        from .tv import load_torchvision_encoder

        enc = load_torchvision_encoder(arch, path)
    elif scheme == "timm" and rest:
        name, path = _timm_name_path(rest)
        from .timm_enc import load_timm_encoder

        enc = load_timm_encoder(name, path, pool=opts.get("pool"))
    elif scheme == "hf" and rest:
        from .hf import load_hf_encoder

        enc = load_hf_encoder(rest, pool=opts.get("pool"))
    elif scheme in SCHEMES:
        what = "MODEL_NAME[:PATH]" if scheme == "timm" else "DIR" if scheme == "hf" else "PATH"
        raise SpecError(f"encoder spec '{spec}' needs a {what.lower()}: write {scheme}:{what}")
    else:
        raise unknown("encoder spec scheme", scheme, SCHEMES)
    files: list = [f for f, _ in spec_files(base)]
    if not files and _reads_hub(base):
        files = _hub_files(enc)
    enc.meta.setdefault("source", spec)
    enc.source_files = [
        {"path": str(f), "sha256": file_sha256(f)} for f in files if isinstance(f, Path) and f.is_file()
    ] + [f for f in files if isinstance(f, dict)]
    return enc.eval()


def spec_files(spec: str) -> list[tuple[Path, bool]]:
    """The local files a spec reads, found without loading anything: ``[(path, required)]``.

    ``required`` is False for a file that is read only when present (solo-learn's ``args.json``,
    the shipped demo asset, which is rebuilt into a cache when absent). Weights a library fetches
    from its hub (``timm:NAME``, ``hf:ORG/NAME``) and random weights are no local file: ``[]``.
    ``$VARS`` are not expanded here.
    """
    base, _ = split_spec_options(spec)
    scheme, _, rest = base.partition(":")
    if scheme == "demo" and not rest:
        from .demo import ASSET

        return [(ASSET, False)]
    if scheme == "demo-vit" and not rest:
        from .demo import ASSET_VIT

        return [(ASSET_VIT, True)]
    if scheme == "demo-vit-mix" and not rest:
        from .demo import ASSET_VIT_MIX

        return [(ASSET_VIT_MIX, True)]
    if scheme == "file" and rest:
        return [(Path(rest), True)]
    if scheme == "solo" and rest:
        return [(Path(rest), True), (Path(rest).parent / "args.json", False)]
    if scheme == "torchvision" and rest:
        _, sep, path = rest.partition(":")
        return [(Path(path), True)] if sep and path else []
    if scheme == "timm" and rest:
        path = _timm_name_path(rest)[1]
        return [(Path(path), True)] if path else []
    if scheme == "hf" and rest:
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            return []
        weights = [(f, True) for f in sorted(folder.glob("model*.safetensors"))]
        return [(folder / "config.json", True), (folder / "preprocessor_config.json", True), *weights]
    return []


def _reads_hub(spec: str) -> bool:
    """``timm:NAME`` without a path, or ``hf:`` with a hub id: weights from the library's hub cache."""
    scheme, _, rest = split_spec_options(spec)[0].partition(":")
    if scheme == "timm" and rest:
        return _timm_name_path(rest)[1] is None
    return scheme == "hf" and bool(rest) and not Path(rest).expanduser().is_dir()


def _timm_name_path(rest: str) -> tuple[str, str | None]:
    """``NAME[:PATH]``; a hub name ``hf-hub:ORG/NAME`` keeps its own colon."""
    prefix = ""
    for hub in ("hf-hub:", "hf_hub:"):
        if rest.startswith(hub):
            prefix, rest = hub, rest[len(hub) :]
    name, sep, path = rest.partition(":")
    if sep and not path:
        raise SpecError(f"timm spec 'timm:{prefix}{rest}' ends with ':'; write timm:MODEL_NAME or timm:MODEL_NAME:PATH")
    return prefix + name, (path or None)


def _hub_files(enc: Encoder) -> list:
    """Where the library's hub cache keeps the weights just loaded (recorded with their sha256)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return [{"path": None, "sha256": None, "note": "weights from the library's hub cache (not located)"}]
    meta = enc.meta
    repo = meta.get("pretrained_source", "")
    repo = repo.removeprefix("huggingface.co/")
    out: list = []
    for name in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, name) if repo and "://" not in repo else None
        if isinstance(hit, str):
            out.append(Path(hit))
            break
    return out or [{"path": None, "sha256": None, "note": f"weights of {repo or 'the hub'} not found in the hub cache"}]


_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (cached per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]
