"""BatchNorm folded into the convolution before it, for the attacks of adversarial training.

An attack runs the model in eval mode (``genaf.attacks.base.eval_mode``). There a BatchNorm2d
is a fixed per-channel affine map ``y = γ (z − μ) / √(σ² + ε) + β`` with its running
statistics ``μ, σ²``. When it reads the output of a Conv2d that nothing else reads, the pair
is one convolution with weight ``W · s`` and bias ``(b − μ) · s + β``, ``s = γ / √(σ² + ε)``:
the same function up to float rounding, with one normalisation kernel fewer per pair in the
forward pass and in every input-gradient backward pass.

:class:`AttackFold` keeps a folded copy of a model for that purpose. The trained module is
never touched: the copy shares no tensor with it, stays in eval mode with its parameters not
requiring gradients, and :meth:`AttackFold.refresh` (called by every use) rewrites the copy's
tensors in place from the trained module's current weights and running statistics, so the
copy is current after every optimiser step and every train-mode forward.

**Only for eval mode.** In train mode a BatchNorm normalises with the batch's statistics and
updates its running ones; the folded copy computes neither, so it must never stand in for a
train-mode forward (the training forwards of a step, which update BatchNorm, use the trained
module itself).

Which pairs are folded is decided from the model's traced graph (``torch.fx``, traced in eval
mode), never from module names alone: a Conv2d call whose only user is a BatchNorm2d call
taking it as its sole input. Both modules must be exactly those classes (a subclass such as
timm's ``BatchNormAct2d`` or a weight-standardised conv computes something else), called once,
without hooks, with their own parameters, and the BatchNorm must track running statistics.
Anything else, and any model that cannot be traced, is left unfolded; a model with nothing to
fold (a ViT: LayerNorm) is attacked as it is, with no copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .attacks.base import eval_mode

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _has_hooks(m: nn.Module) -> bool:
    return any(
        getattr(m, d, None) for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """The (conv, bn) module-name pairs of ``model`` that fold exactly, and a note (why none,
    when none; empty otherwise)."""
    import torch.fx as fx

    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.BatchNorm2d) for m in modules.values()):
        return [], "no BatchNorm2d"

    class _Tracer(fx.Tracer):
        # every normalisation and convolution module is one opaque call, subclasses too (timm's
        # BatchNormAct2d, Conv2dSame, ...): they are never folded, and their code need not trace
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            norm = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
            return isinstance(m, (*norm, nn.modules.conv._ConvNd)) or super().is_leaf_module(m, qualname)

    try:
        with eval_mode(model):
            graph = _Tracer().trace(model)
    except Exception as exc:  # untraceable (data-dependent control flow, ...): fold nothing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [], f"not traceable by torch.fx ({first[:120]})"
    calls: dict[str, int] = {}
    attrs: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attrs.append(str(node.target))
    # a module registered under two names, or a tensor owned by two modules, is not folded
    seen_mods: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen_mods[id(m)] = seen_mods.get(id(m), 0) + 1
    seen_tensors: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen_tensors[id(p)] = seen_tensors.get(id(p), 0) + 1

    def own(name: str) -> bool:
        m = modules[name]
        if seen_mods[id(m)] != 1 or calls.get(name) != 1 or _has_hooks(m):
            return False
        if any(a == name or a.startswith(name + ".") for a in attrs):
            return False
        return all(seen_tensors[id(p)] == 1 for p in m.parameters(recurse=False))

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        bn = modules[node.target]
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or type(modules.get(src.target)) is not nn.Conv2d:
            continue
        conv = modules[src.target]
        if len(src.users) != 1 or conv.out_channels != bn.num_features:
            continue
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            continue  # eval mode then normalises with batch statistics: not an affine map
        if own(src.target) and own(node.target):
            pairs.append((str(src.target), str(node.target)))
    return pairs, "" if pairs else "no Conv2d → BatchNorm2d pair that folds exactly"


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class AttackFold:
    """A folded copy of ``model`` for eval-mode attacks (see the module docstring).

    ``fold(m)`` returns the refreshed copy when ``m`` is the model it was built from and there
    is something to fold, and ``m`` itself otherwise. ``info()`` says what was folded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.source = model
        self.pairs, self.note = find_conv_bn_pairs(model)
        self.copy: nn.Module | None = None
        if self.pairs:
            self._build()

    def _build(self) -> None:
        src = self.source
        # hooks (e.g. the Trainer's pass counter) are kept by reference, not deep-copied
        memo: dict = {}
        for m in src.modules():
            for d in _HOOK_DICTS:
                for h in (getattr(m, d, None) or {}).values():
                    memo[id(h)] = h
        cp = copy.deepcopy(src, memo)
        folded_convs = {c for c, _ in self.pairs}
        for conv_name, bn_name in self.pairs:
            conv = cp.get_submodule(conv_name)
            if conv.bias is None:
                w = conv.weight
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=w.device, dtype=w.dtype))
            _set_module(cp, bn_name, nn.Identity())
        cp.eval().requires_grad_(False)
        s_named = {**dict(src.named_parameters()), **dict(src.named_buffers())}
        c_named = {**dict(cp.named_parameters()), **dict(cp.named_buffers())}
        folded_keys = {f"{c}.{k}" for c in folded_convs for k in ("weight", "bias")}
        plain = [k for k in c_named if k not in folded_keys]
        self._plain_src = [s_named[k] for k in plain]
        self._plain_dst = [c_named[k] for k in plain]
        mods = dict(src.named_modules())
        convs = [mods[c] for c, _ in self.pairs]
        bns = [mods[b] for _, b in self.pairs]
        self._w_src = [c.weight for c in convs]
        self._b_src = [c.bias for c in convs]  # None where the conv has no bias
        self._bn = bns
        self._w_dst = [c_named[f"{c}.weight"] for c, _ in self.pairs]
        self._b_dst = [c_named[f"{c}.bias"] for c, _ in self.pairs]
        self.copy = cp
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rewrite the copy's tensors from the source's current values (in place, no new copy)."""
        if self.copy is None:
            return
        if self._plain_dst:
            torch._foreach_copy_(self._plain_dst, self._plain_src)
        # in float32 at least (float64 models in float64), written into the copy's tensors
        for i, bn in enumerate(self._bn):
            w_src, b_src, w_dst, b_dst = self._w_src[i], self._b_src[i], self._w_dst[i], self._b_dst[i]
            t = torch.promote_types(w_src.dtype, torch.float32)
            scale = torch.rsqrt(bn.running_var.to(t) + bn.eps)
            if bn.affine:
                scale = scale * bn.weight.to(t)
            shape = (-1,) + (1,) * (w_src.dim() - 1)
            if t == w_dst.dtype:
                torch.mul(w_src.to(t), scale.view(shape), out=w_dst)
            else:
                w_dst.copy_(w_src.to(t) * scale.view(shape))
            mean = bn.running_mean.to(t)
            shift = (b_src.to(t) - mean if b_src is not None else -mean) * scale
            b_dst.copy_(shift + bn.bias.to(t) if bn.affine else shift)

    def __call__(self, model: nn.Module) -> nn.Module:
        if self.copy is None or model is not self.source:
            return model
        self.refresh()
        return self.copy

    def info(self) -> dict:
        out: dict = {"folded_pairs": len(self.pairs)}
        if self.note:
            out["note"] = self.note
        return out


__all__ = ["AttackFold", "find_conv_bn_pairs"]
