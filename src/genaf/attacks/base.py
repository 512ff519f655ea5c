"""Shared attack machinery: the registry, eval-mode handling, layer taps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, unknown

_ATTACKS: dict[str, type] = {}


def register_attack(name: str) -> Callable[[type], type]:
    """Class decorator adding an attack to the registry under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return deco


def attack_names() -> list[str]:
    _import_all()
    return sorted(_ATTACKS)


def create_attack(name: str, encoder: nn.Module, preset: str = "cpu", **cfg: Any):
    """Build a registered DAE attack on ``encoder`` from a named preset plus overrides."""
    _import_all()
    if name not in _ATTACKS:
        raise unknown("attack", name, _ATTACKS)
    cls = _ATTACKS[name]
    presets = getattr(cls, "presets", {})
    if preset not in presets:
        raise unknown(f"preset for attack {name}", preset, presets)
    params = dict(presets[preset])
    bad = [k for k in cfg if k not in params and k not in getattr(cls, "extra_keys", ())]
    if bad:
        raise ConfigError(f"attack {name} has no option(s) {bad}; its options are: {', '.join(sorted(params))}")
    params.update({k: v for k, v in cfg.items() if v is not None})
    return cls(encoder, preset=preset, **params)


def _import_all() -> None:
    """Import every module of the package, so each registers its attacks."""
    import importlib
    import pkgutil

    from .. import attacks

    for info in pkgutil.iter_modules(attacks.__path__):
        importlib.import_module(f"{attacks.__name__}.{info.name}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.train(t)


class _Stop(Exception):
    pass


class LayerTap:
    """Capture the outputs of named submodules during a forward pass.

    With ``stop_early=True`` the forward pass stops once every tapped output is captured, so
    objectives on low layers do not pay for the rest of the network.
    """

    def __init__(self, encoder: nn.Module, names: list[str], stop_early: bool = True) -> None:
        self.encoder = encoder
        self.names = list(names)
        self.stop_early = stop_early
        getter = encoder.get_layer
        self.modules = {n: getter(n) for n in self.names}
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.outputs = {}
        handles = []

        def hook(name):
            def fn(_m, _inp, out):
                if isinstance(out, (tuple, list)):  # e.g. Hugging Face layers: (hidden_states, ...)
                    out = out[0]
                if name not in self.outputs:
                    self.outputs[name] = out
                if self.stop_early and len(self.outputs) == len(self.names):
                    raise _Stop

            return fn

        for n, m in self.modules.items():
            handles.append(m.register_forward_hook(hook(n)))
        try:
            self.encoder(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise ConfigError(f"layers {missing} were not reached by the encoder's forward pass")
        return self.outputs


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x only: no gradient ever lands in a parameter.

    A model that cuts its input out of the graph (e.g. ``x.detach()`` inside ``forward``) gets
    a zero gradient here rather than a crash; the evaluation self-checks flag that case.
    """
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss, x, only_inputs=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


class EncoderAttack:
    """What every attack on an encoder shares: its options (``cfg``), the budget ``eps`` in
    pixel units, the ``seed``, and the output of the ``layer`` option (the encoder's features
    when it is empty or absent)."""

    name = "attack"
    presets: dict[str, dict[str, Any]] = {}

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        from ..utils import check_eps

        self.encoder = encoder
        self.preset = preset
        self.cfg = cfg
        self.eps = check_eps(cfg["eps"])
        self.seed = int(cfg.get("seed", 0))
        self.layer = str(cfg.get("layer") or "")
        auto = [k for k in ("layer", "layer2") if cfg.get(k) == "auto"]
        if auto and not getattr(type(self), "auto_layer", False):
            raise ConfigError(
                f"attack {self.name} does not support {auto[0]}: auto (l4a-base, l4a-fuse, std and "
                "ssp-universal do); give a layer name"
            )
        self.tap = LayerTap(encoder, [self.layer]) if self.layer and self.layer != "auto" else None

    def layer_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the ``layer`` option's module (the encoder's features when it is '')."""
        if self.layer == "auto":
            raise ConfigError(f"{self.name}: layer 'auto' is resolved by fit(); score a fitted layer by name")
        if self.tap is None:
            return self.encoder(x)
        return self.tap(x)[self.layer]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.cfg.items())})"
