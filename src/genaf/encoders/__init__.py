"""Loading public pre-trained encoders: ``genaf.load_encoder(spec) -> Encoder``.

Specs:
    ``solo:PATH``                 a solo-learn Lightning checkpoint (``args.json`` beside it is read)
    ``torchvision:ARCH:PATH``     a torchvision classification model's state dict (``fc`` dropped)
    ``file:PATH``                 a genaf encoder file (``.pt`` or ``.safetensors``)
    ``demo``                      the project's small Fashion-MNIST encoder (offline)
    ``random:demo``               the demo architecture with random weights (a control)

Loading is strict and never unpickles anything beyond tensors and plain containers.
"""

from __future__ import annotations

from ..errors import SpecError, unknown
from .base import DATASET_STATS, Encoder, Normalize, encoder_from_state, load_state_strict
from .demo import DEMO_META, demo_encoder, random_encoder
from .files import load_encoder_file, read_encoder_file, save_encoder

SCHEMES = ("solo", "torchvision", "file", "demo", "random")

__all__ = [
    "DATASET_STATS",
    "DEMO_META",
    "Encoder",
    "Normalize",
    "encoder_from_state",
    "load_encoder",
    "load_state_strict",
    "read_encoder_file",
    "save_encoder",
]


def load_encoder(spec: str) -> Encoder:
    """Load an encoder from a spec string (see module docstring). Returns it in eval mode."""
    if not isinstance(spec, str) or not spec:
        raise SpecError("encoder spec must be a non-empty string such as 'demo', 'solo:PATH' or 'file:PATH'")
    scheme, _, rest = spec.partition(":")
    if scheme == "demo" and not rest:
        enc = demo_encoder()
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
    elif scheme in SCHEMES:
        raise SpecError(f"encoder spec '{spec}' needs a path: write {scheme}:PATH")
    else:
        raise unknown("encoder spec scheme", scheme, SCHEMES)
    enc.meta.setdefault("source", spec)
    return enc.eval()
