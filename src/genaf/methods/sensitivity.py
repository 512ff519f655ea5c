r"""Robust sensitivity of layers (Gen-AF stage 2; RiFT's module robust criticality).

For a layer ``i`` with weight ``W_i``:
``ρ_i = max_{‖ΔW‖_F ≤ η‖W_i‖_F} L_rob(W_i + ΔW) − L_rob(W_i)`` with only layer ``i`` perturbed,
``L_rob`` the mean cross-entropy on an adversarial probe set, the model in eval mode.
The maximum is approximated by projected, normalised gradient ascent on ``ΔW`` (projection
after every step), then the loss is evaluated on the whole probe; the score is the largest
whole-probe loss seen minus the unperturbed one.

Cost (what makes scoring every layer cheap):

- the first ascent step starts at ``ΔW = 0``, where the gradient of ``L_rob`` with respect to
  ``W_i`` is the same whether one layer or all of them are perturbable: one forward and
  backward pass over the probe gives the first step of every unit at once (and ``L_rob(W)``);
- the remaining ``steps − 1`` steps of a unit may use a leading fraction of the probe
  (``ascent_fraction``); the final evaluation always uses the whole probe;
- during a unit's steps only that unit's tensors require gradients, so no graph is built
  below the scored layer and the backward pass never runs past it;
- the forward pass does not recompute what the perturbation cannot change: the outputs of the
  backbone's chain of blocks (a ResNet's residual blocks in order, a ViT's transformer blocks)
  are kept for the whole probe from one unperturbed pass (:class:`PrefixCache`), and a unit
  inside block ``j`` (or in the head, after every block) starts from block ``j − 1``'s kept
  output. The scores are those of full forward passes: the chain is checked on the probe's
  first batch before it is used (every skip must reproduce the model's logits), and a model
  whose blocks do not form a chain is scored with full passes.

A *unit* is a named parameter group picked by a selector (here: each Conv2d/Linear weight),
so other groupings can be scored by passing other units. The default is by module type, so it
serves every backbone: a ResNet's convolutions and the head's Linear layers; a Vision
Transformer's patch-embedding convolution and, per block, ``attn.qkv``, ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2``. Normalisation layers (BatchNorm, LayerNorm), position embeddings
and class tokens are never units: they stay frozen in stage 2.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import eval_mode
from ..attacks.whitebox import frozen_params
from ..utils import Progress, uncounted


def weight_units(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The default selector: every Conv2d/Linear module's weight, by full module name
    (BatchNorm, LayerNorm, position embeddings and class tokens excluded). Other selectors may
    return several tensors per unit (e.g. a whole ViT block), which are then perturbed
    jointly under one Frobenius budget."""
    return {n: [m.weight] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def _mean_ce(model, xs, ys, batch_size, cache: PrefixCache | None = None) -> float:
    total = 0.0
    for i in range(0, len(xs), batch_size):
        if cache is not None:
            cache.offset = i
        total += float(F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum"))
    return total / len(xs)


def _loss_and_grads(model, xs, ys, params, batch_size, cache=None) -> tuple[float, list[torch.Tensor]]:
    """Mean cross-entropy over ``xs`` and its gradient with respect to ``params`` (which are
    made to require gradients for the call; everything else is assumed frozen)."""
    total, grads = _loss_and_grad_sums(model, xs, ys, params, batch_size, cache)
    return total / len(xs), [g / len(xs) for g in grads]


def _loss_and_grad_sums(model, xs, ys, params, batch_size, cache=None) -> tuple[float, list[torch.Tensor]]:
    """The summed cross-entropy over ``xs`` and its gradient (see :func:`_loss_and_grads`)."""
    for p in params:
        p.requires_grad_(True)
    try:
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        for i in range(0, len(xs), batch_size):
            if cache is not None:
                cache.offset = i
            with torch.enable_grad():
                loss = F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum")
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, gi in zip(grads, gs):
                if gi is not None:
                    acc += gi
            total += float(loss.detach())
    finally:
        for p in params:
            p.requires_grad_(False)
    return total, grads


def _norm(ts) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in ts)))


def block_chain(model: nn.Module) -> list[str]:
    """The backbone's blocks in order, by full module name (:mod:`genaf.encoders.layout`): a
    CNN's stages' blocks one after another, or a transformer's blocks; [] when none are found."""
    from ..encoders.layout import _inner_blocks, _join, block_names, stage_names

    for prefix, mod in model.named_modules():
        stages = stage_names(mod)
        if stages:
            return [_join(prefix, b) for st in stages for b in _inner_blocks(st, mod.get_submodule(st))]
        blocks = block_names(mod)
        if blocks:
            return [_join(prefix, b) for b in blocks]
    return []


# The most memory the kept block outputs may take (bytes); beyond it only every k-th block's
# output is kept (a unit then starts from the nearest kept block before its own).
PREFIX_CACHE_BYTES = 2 * 1024**3


class PrefixCache:
    """The outputs of a chain of blocks on the whole probe, from one unperturbed pass, to start
    a perturbed forward pass at the block that holds the perturbed unit (see the module
    docstring). Use :meth:`skip` around the passes of one unit; the loops set :attr:`offset`
    (the probe row the next batch starts at). :attr:`active` is False (and nothing is skipped)
    when the model has no chain of blocks or a skip did not reproduce the full pass."""

    def __init__(
        self, model: nn.Module, xs: torch.Tensor, batch_size: int, log=None, budget: int = PREFIX_CACHE_BYTES
    ) -> None:
        self.model, self.offset, self.active, self.reason = model, 0, False, ""
        names = block_chain(model)
        self.blocks = [model.get_submodule(n) for n in names]
        self.names = names
        self.kept: dict[int, torch.Tensor] = {}
        self.position: dict[int, int] = {}  # id(module) -> blocks completed before its first call
        if len(self.blocks) < 2:
            self.reason = "no chain of blocks found"
            return
        n = len(xs)
        outs: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(self.blocks))}
        done = [0]
        hooks = []

        def after(j):
            def hook(_m, _args, out):
                if isinstance(out, torch.Tensor):
                    outs[j].append(out.detach())
                done[0] = j + 1

            return hook

        def before(mod):
            def hook(_m, _args):
                self.position.setdefault(id(mod), done[0])

            return hook

        for j, b in enumerate(self.blocks):
            hooks.append(b.register_forward_hook(after(j)))
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_pre_hook(before(m)))
        try:
            with torch.no_grad(), uncounted():
                first = model(xs[:batch_size])
                per_row = [sum(t.numel() * t.element_size() for t in outs[j]) / len(first) for j in outs]
                if any(len(outs[j]) != 1 for j in outs):
                    self.reason = "a block is called more than once, or returns no tensor"
                    return
                every = max(1, math.ceil(sum(per_row) * n / budget))
                keep = [j for j in range(len(self.blocks)) if (j + 1) % every == 0]
                parts = {j: [outs[j][0]] for j in keep}
                for i in range(batch_size, n, batch_size):
                    for j in outs:
                        outs[j].clear()
                    done[0] = 0
                    model(xs[i : i + batch_size])
                    for j in keep:
                        parts[j].append(outs[j][0])
        finally:
            for h in hooks:
                h.remove()
        self.kept = {j: torch.cat(parts[j]) for j in keep}
        # the chain must hold: every skip reproduces the full pass on the first batch
        with torch.no_grad(), uncounted():
            for s in range(1, len(self.blocks) + 1):
                self.offset = 0
                try:
                    with self._skipping(s):
                        out = model(xs[:batch_size])
                except (RuntimeError, ValueError, TypeError) as e:  # e.g. a stage's downsampling between blocks
                    out, why = None, f"skipping to after {names[s - 1]} fails ({type(e).__name__})"
                else:
                    why = f"skipping to after {names[s - 1]} changes the model's output"
                if out is None or out.shape != first.shape or not torch.allclose(out, first, rtol=1e-5, atol=1e-6):
                    self.kept, self.reason = {}, why
                    break
            else:
                self.active = True
        if not self.active and log:
            log(f"stage 2: scoring with full forward passes ({self.reason})")

    def _start(self, s: int) -> int:
        """The kept block to start from when the first ``s`` blocks are unchanged (-1: none)."""
        return max((j for j in self.kept if j < s), default=-1)

    @contextlib.contextmanager
    def _skipping(self, s: int):
        c = self._start(s)
        if c < 0:
            yield
            return
        kept = self.kept[c]

        def start(x, *_a, **_k):
            return kept[self.offset : self.offset + len(x)]

        def identity(x, *_a, **_k):
            return x

        patched = [(self.blocks[0], start)] + [(b, identity) for b in self.blocks[1 : c + 1]]
        for b, f in patched:
            b.forward = f
        try:
            yield
        finally:
            for b, _ in patched:
                del b.forward

    def skip(self, params: list[nn.Parameter]):
        """A context in which the model's passes start after the last block that none of
        ``params`` is in (a no-op when inactive or when a parameter's module was never seen)."""
        if not self.active:
            return contextlib.nullcontext()
        owners = {id(p): m for m in self.model.modules() for p in m.parameters(recurse=False)}
        where = [self.position.get(id(owners.get(id(p)))) for p in params]
        if any(w is None for w in where):
            return contextlib.nullcontext()
        return self._skipping(min(where))


def robust_sensitivity(
    model: nn.Module,
    probe_x: torch.Tensor,
    probe_y: torch.Tensor,
    units: dict[str, list[nn.Parameter]] | None = None,
    eta: float = 0.1,
    steps: int = 10,
    step_size: float = 1.0,
    batch_size: int = 512,
    seed: int = 0,
    log=None,
    ascent_fraction: float = 1.0,
    parallel=None,
    prefix_cache: bool = True,
) -> dict[str, float]:
    """The robust sensitivity dictionary ``{unit name: ρ}`` (see the module docstring).

    ``units`` maps a name to the parameter tensors perturbed together (default: each
    Conv2d/Linear weight). ``steps`` normalised ascent steps of ``step_size``·``η‖W‖_F`` each
    (the first one shared by all units), each followed by the projection onto the ball; with
    ``step_size`` 1 (the default) every step ends on its boundary, where the reference
    procedure's large SGD steps end too (see ``stage2_common.SENSITIVITY_STEP``). Steps after
    the first use the leading
    ``ascent_fraction`` of the probe (at least 64 images). The ascent is deterministic
    (``seed`` is accepted for compatibility). Weights, ``requires_grad`` flags and module
    modes are restored exactly.

    ``parallel`` (``ctx.parallel`` under torchrun; a ``genaf.distributed.Team``): every process
    computes the shared first step on its rows of the probe (the sums are added up across the
    processes), scores its share of the units (round robin) on the whole probe, and every process
    returns the merged dictionary, in the order of ``units``. A unit's score is computed by one
    process exactly as a single process computes it.

    ``prefix_cache`` (default on): start each unit's passes from the kept output of the block
    before it (:class:`PrefixCache`); off, every pass runs the whole model (same scores).
    """
    units = units if units is not None else weight_units(model)
    n = len(probe_x)
    m = n if ascent_fraction >= 1 else min(n, max(64, math.ceil(ascent_fraction * n)))
    sub_x, sub_y = probe_x[:m], probe_y[:m]
    scores: dict[str, float] = {}
    team = parallel
    distributed = team is not None and team.distributed
    with eval_mode(model), frozen_params(model):
        if steps >= 1:
            every = list({id(p): p for ps in units.values() for p in ps}.values())
            if distributed:
                lo, hi = team.rows(n)
                total, sums = _loss_and_grad_sums(model, probe_x[lo:hi], probe_y[lo:hi], every, batch_size)
                parts = [torch.tensor([total], dtype=torch.float64)] + [g.double().flatten() for g in sums]
                flat = team.sum_(torch.cat(parts))
                base, at, g_all = float(flat[0]) / n, 1, []
                for g in sums:
                    g_all.append((flat[at : at + g.numel()] / n).view_as(g).to(g.dtype))
                    at += g.numel()
            else:
                base, g_all = _loss_and_grads(model, probe_x, probe_y, every, batch_size)
            first = {id(p): g for p, g in zip(every, g_all)}
        else:
            base, first = _mean_ce(model, probe_x, probe_y, batch_size), {}
        mine = team.split(list(units.items())) if distributed else list(units.items())
        cache = PrefixCache(model, probe_x, batch_size, log=log) if prefix_cache and steps >= 1 and mine else None
        bar = Progress(len(mine), "stage 2: robust sensitivity", unit="layers", log=log)
        for name, params in mine:
            w0 = [p.detach().clone() for p in params]
            radius = eta * _norm(w0)
            best = base
            d = [torch.zeros_like(t) for t in w0]
            try:
                grads = [first[id(p)] for p in params] if steps >= 1 else []
                with cache.skip(params) if cache is not None else contextlib.nullcontext():
                    for k in range(steps):
                        if k > 0:
                            for p, t0, dt in zip(params, w0, d):
                                p.data.copy_(t0 + dt)
                            loss, grads = _loss_and_grads(model, sub_x, sub_y, params, batch_size, cache)
                            if m == n:
                                best = max(best, loss)
                        gn = _norm(grads)
                        if gn == 0 or radius == 0:
                            break
                        d = [dt + step_size * radius * gt / gn for dt, gt in zip(d, grads)]
                        dn = _norm(d)
                        if dn > radius:
                            d = [dt * (radius / dn) for dt in d]
                    if any(bool(dt.any()) for dt in d):
                        for p, t0, dt in zip(params, w0, d):
                            p.data.copy_(t0 + dt)
                        best = max(best, _mean_ce(model, probe_x, probe_y, batch_size, cache))
            finally:
                for p, t0 in zip(params, w0):
                    p.data.copy_(t0)
            scores[name] = best - base
            bar.update(1, f"{name}: rho (CE rise under the weight perturbation) {scores[name]:.4f}")
        bar.close()
    if distributed:
        merged = team.merge(scores)
        scores = {name: float(merged[name]) for name in units}
    return scores


def select_redundant(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` units with the lowest robust sensitivity (ties broken by name)."""
    return [n for n, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]
