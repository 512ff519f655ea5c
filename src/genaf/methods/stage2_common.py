"""Selective fine-tuning of robust-redundant layers: what Gen-AF stage 2 (METHOD.md §4) and
RiFT (Zhu et al., ICCV 2023; METHOD.md §6) share.

1. ``craft_probe``: PGD examples crafted against the current model from the validation split.
2. ``select_layers``: the robust sensitivity dictionary of every unit
   (:func:`genaf.methods.sensitivity.robust_sensitivity`) and the k lowest.
3. ``selected_params`` / ``train_only`` / ``freeze_batchnorm``: only the selected layers'
   weights and biases train; every other parameter and every BatchNorm statistic is frozen.
4. ``evolve``: interpolate ``θ_α = (1 − α) θ_start + α θ_end`` for α ∈ {0, 0.1, …, 1} and
   keep the best validation clean accuracy whose validation robust accuracy stays within a
   tolerance of the starting model's.

``SelectiveFineTuning`` is the stage built from these pieces; a method subclasses it and
says how many layers to pick, with which optimiser, and whether (and how tightly) to evolve.
The Trainer stores the model before such a stage (``snapshot_start``) as the artefacts
``stage1_state`` and ``stage1_val`` (its validation), which ``evolve`` interpolates from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.whitebox import pgd
from ..errors import ConfigError
from .base import Context, ParamGroup, Stage, parallel_of
from .sensitivity import robust_sensitivity, select_redundant, weight_units


def craft_probe(model: nn.Module, ctx: Context, cfg: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD-K examples (ε, step, K of ``cfg``, random start) against ``model`` from the first
    ``cfg['probe_size']`` validation images; returns ``(x_adv, y)``. In fast mode (K = 1 with
    a ``fast_step_factor``) the probe is FGSM-RS, like the training attack."""
    val = ctx.data.val.subset(cfg["probe_size"])
    xs, ys = val.float_images().to(ctx.device), val.labels.to(ctx.device)
    team = parallel_of(ctx)  # under torchrun each process crafts its rows of every batch; all gathered
    gen = team.generator(ctx.seed, key)
    step = cfg["attack_step"]
    if cfg["attack_steps"] == 1 and cfg.get("fast_step_factor", 0):
        step = cfg["fast_step_factor"] * cfg["eps"]
    parts = []
    for i in range(0, len(xs), 256):
        x, y = xs[i : i + 256], ys[i : i + 256]
        lo, hi = team.set_rows(gen, len(x))
        xa = pgd(model, x[lo:hi], y[lo:hi], cfg["eps"], step, cfg["attack_steps"], random_start=True, gen=gen)
        parts.append(team.gather_rows(xa))
    return torch.cat(parts), ys


# The length of each ascent step of the sensitivity scoring, as a fraction of the radius η‖W‖,
# when a method's configuration does not set ``sensitivity_step`` (RiFT's does not). A full
# radius: each step lands on the boundary ‖ΔW‖_F = η‖W‖_F after its projection, as the reference
# procedure's (RiFT-style SGD with lr 1 on the mean cross-entropy) do: its steps are 0.4-15 times
# the radius on the demo model, so after its first epochs every layer sits on the boundary and
# each further epoch re-aims the perturbation along the new gradient. Steps of half the radius
# (the earlier default, with two steps) ended inside the ball whenever the second gradient
# turned away from the first and under-estimated ρ most where the loss curves most along the
# ascent (early convolutions: a fifth of the reference's ρ), ranking such layers as
# robust-redundant. benchmarks/RESULTS.md, run 6, has the measurement.
SENSITIVITY_STEP = 1.0


def select_layers(model: nn.Module, ctx: Context, cfg: dict, n_selected, key: str, label: str) -> dict:
    """Score every Conv2d/Linear layer (a ViT: each block's qkv, proj, fc1, fc2, the patch
    embedding and the head; :func:`~genaf.methods.sensitivity.weight_units`) on a PGD probe and
    pick the ``n_selected(n_units)`` lowest. Returns the JSON-able artefacts (``sensitivity``,
    ``selected``, ``k``, ...)."""
    adv, ys = craft_probe(model, ctx, cfg, key)
    units = weight_units(model)
    k = int(n_selected(len(units)))
    if k > len(units):
        raise ConfigError(f"{label}: k={k} but the model has only {len(units)} Conv2d/Linear layers")
    ctx.log(f"{label}: robust sensitivity of {len(units)} layers on a probe of {len(adv)} PGD examples")
    from ..data.module import small_split_warning

    warn = small_split_warning(f"{label} probe (validation PGD examples)", len(adv), flag="probe_size")
    if warn:
        import sys

        ctx.log(warn)
        print(f"genaf: {warn}", file=sys.stderr)
    fraction = float(cfg.get("sensitivity_fraction", 1.0))
    step_size = float(cfg.get("sensitivity_step", SENSITIVITY_STEP))
    scores = robust_sensitivity(
        model,
        adv,
        ys,
        units,
        eta=cfg["eta"],
        steps=cfg["sensitivity_steps"],
        step_size=step_size,
        seed=ctx.seed,
        ascent_fraction=fraction,
        log=ctx.log,
        parallel=parallel_of(ctx),
    )
    selected = select_redundant(scores, k)
    ctx.log(f"{label}: fine-tuning the {k} most robust-redundant layers: {', '.join(selected)}")
    return {
        "sensitivity": scores,
        "selected": selected,
        "k": k,
        "probe_size": len(adv),
        "eta": cfg["eta"],
        "steps": cfg["sensitivity_steps"],
        "ascent_fraction": fraction,
        "step_size": step_size,
    }


def selected_params(model: nn.Module, selected: list[str]) -> list[nn.Parameter]:
    """The selected units' tensors plus their modules' other direct parameters (biases)."""
    modules = dict(model.named_modules())
    units = weight_units(model)
    out, seen = [], set()
    for n in selected:
        extra = list(modules[n].parameters(recurse=False)) if n in modules else []
        for p in units[n] + extra:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def train_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    """``requires_grad`` on ``params`` only (``unfreeze`` undoes it)."""
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def unfreeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def freeze_batchnorm(model: nn.Module) -> None:
    """Every normalisation layer (BatchNorm, and a ViT's LayerNorm/GroupNorm alike) in eval mode:
    BatchNorm's running statistics are neither used from the batch nor updated. Their affine
    parameters are never units (:func:`~genaf.methods.sensitivity.weight_units`), so they stay
    frozen with everything else that is not selected."""
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            m.eval()


def interpolate(start: dict, end: dict, alpha: float) -> dict:
    """``(1 − α)·start + α·end`` for floating-point entries; integer entries (BatchNorm's
    ``num_batches_tracked``) and tensors the stage left unchanged are kept bit-exactly."""
    out = {}
    for k, v in end.items():
        s = start[k].to(v)
        if not v.is_floating_point() or torch.equal(s, v):
            out[k] = v
        else:
            out[k] = s * (1 - alpha) + v * alpha
    return out


def evolve(model: nn.Module, ctx: Context, evaluate, tolerance: float, label: str = "evolution") -> dict:
    """Choose α ∈ {0, 0.1, …, 1} on validation (see the module docstring) and load ``θ_α``.

    Returns ``{"evolution": [one row per α], "alpha": α}``, or ``{}`` without a starting state.
    """
    start = ctx.artifacts.get("stage1_state")
    if start is None:
        return {}
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref_rob = ctx.artifacts.get("stage1_val", {}).get("val_robust")
    rows, best = [], None
    for i in range(11):
        a = i / 10
        model.load_state_dict(interpolate(start, end, a))
        m = evaluate(model)
        ok = ref_rob is None or m["val_robust"] >= ref_rob - tolerance
        rows.append({"alpha": a, **m, "eligible": bool(ok)})
        if ok and (best is None or m["val_clean"] > best[1]["val_clean"]):
            best = (a, m)
    a = best[0] if best else 1.0
    model.load_state_dict(interpolate(start, end, a))
    ctx.log(f"{label}: alpha={a:.1f} chosen on validation")
    return {"evolution": rows, "alpha": a}


class SelectiveFineTuning(Stage):
    """Fine-tune only the most robust-redundant layers on clean data (everything else and
    every BatchNorm statistic frozen), then optionally evolve. Subclasses define
    ``n_selected``, ``optimizer`` and ``evolution`` (and the ``name``/``label``/``probe_key``)."""

    select = "clean"
    needs_val_robust = True
    snapshot_start = True
    label = "selective fine-tuning"
    probe_key = "selective:probe"

    def __init__(self, cfg: dict, epochs: int) -> None:
        super().__init__(cfg, epochs)
        self.selected: list[str] = []

    def n_selected(self, n_units: int) -> int:
        raise NotImplementedError

    def optimizer(self, params: list[nn.Parameter]) -> ParamGroup:
        raise NotImplementedError

    def evolution(self) -> float | None:
        """The robust-accuracy tolerance of the interpolation, or None for no interpolation."""
        return None

    def setup(self, model, ctx):
        out = select_layers(model, ctx, self.cfg, self.n_selected, self.probe_key, self.label)
        self.selected = list(out["selected"])
        return out

    def restore(self, model, ctx, artifacts):
        self.selected = list(artifacts["selected"])

    def _selected_params(self, model):
        return selected_params(model, self.selected)

    def param_groups(self, model):
        params = self._selected_params(model)
        train_only(model, params)
        return [self.optimizer(params)]

    def set_modes(self, model):
        freeze_batchnorm(model)

    def step(self, model, x, y, ctx):
        return {"loss": F.cross_entropy(model(x), y)}

    def finish(self, model, ctx, evaluate):
        unfreeze(model)
        tolerance = self.evolution()
        if tolerance is None:
            return {}
        return evolve(model, ctx, evaluate, tolerance)
