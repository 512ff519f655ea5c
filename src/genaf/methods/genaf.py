"""Gen-AF (METHOD.md §3–4): genetic-directed dual-track adversarial fine-tuning (stage 1),
then robust-sensitivity-guided adaptability fine-tuning of the robust-redundant layers
(stage 2), with an optional weight interpolation ("evolution") chosen on validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import eval_mode, input_grad
from ..attacks.whitebox import frozen_params, pgd
from ..errors import ConfigError
from ..utils import check_eps, draw, generator
from .base import Method, ParamGroup, Stage, head_params, parallel_of, register_method, two_track_groups
from .genetic import genetic_regularizer
from .stage2_common import SelectiveFineTuning

SPACES = ("logits", "features")
GENETIC_BATCHES = ("rank", "global")
STUDENTS = ("clean", "adversarial")
TARGETS = ("adversarial", "clean", "pretrained")

STAGE1_DEFAULTS = {
    "epochs": 10,
    "eps": 8 / 255,
    "attack_step": 2 / 255,
    "attack_steps": 10,
    "random_start": True,
    "encoder_lr": 1e-4,
    "head_lr": 5e-3,
    "weight_decay": 8e-4,
    "gamma": 0.96,
    "forward": "separate",  # "separate" (reference BatchNorm semantics) or "concat"
    "clean_forward": False,  # with lam = 0: also forward the clean batch in train mode (BatchNorm sees it)
    "warmup_epochs": 1,  # clean head-only epochs before adversarial fine-tuning
    "warmup_lr": 5e-3,
    "select": "clean+robust",
    "eps_warmup_epochs": 0,  # adversarial epochs with eps = 0 (clean training) before the attack starts
    "eps_ramp_epochs": 0,  # then epochs over which eps (and the step) grow linearly to their final value
    # Fast mode: attack_steps = 1 is FGSM with a uniform random start and a step of
    # fast_step_factor * eps (Wong et al. 2020), guarded against catastrophic overfitting by a
    # PGD check on held-out validation images after every epoch (see Stage1.end_epoch).
    "fast_step_factor": 1.25,
    "guard": True,
    "guard_size": 128,  # validation images of the check
    "guard_steps": 10,  # PGD steps of the check (at the training eps and attack_step)
    "guard_drop": 0.2,  # collapse: check accuracy below its best so far minus this ...
    "guard_floor": 0.0,  # ... or below this floor
    "guard_fallback_steps": 10,  # PGD steps used after a collapse (guard_action "fallback")
    "guard_action": "fallback",  # or "stop": end the stage, keeping the best epoch so far
}

# What the other adversarial methods (TRADES, MART, FARE) share with stage 1 (fairness,
# METHOD.md §6). The forward options are specific to stage 1's loss; these methods name their
# random start with ``start`` (uniform / gaussian / none) instead of ``random_start``.
ADVERSARIAL_DEFAULTS = {
    k: v for k, v in STAGE1_DEFAULTS.items() if k not in ("forward", "clean_forward", "random_start")
}

GENAF_DEFAULTS = dict(
    STAGE1_DEFAULTS,
    clean_forward=True,
    # λ = 0: the genetic regulariser is off by default, because it has not earned its place
    # (docs/GENAF.md, "How the defaults were chosen"): on the ResNet it never beat λ = 0 beyond
    # seed noise (configs/ablation-small.yaml, 4 seeds), and on the shipped ViT with ~10 labels
    # per class λ = 1e4 lost 11.6 ± 3.6 clean and 12.2 ± 2.4 mean-DAE-robust validation points
    # to λ = 0, with 1e3 and 1e2 also behind (configs/bench-hard-vit-fmnist100.yaml, 5 seeds).
    # The term and its roles below stay: --set lam=1e4 turns it on (the earlier default).
    lam=0.0,
    reduction="mean",
    space="features",
    # configs/ablation-small.yaml, 4 seeds (docs/GENAF.md): the clean features pulled towards the
    # adversarial features' neighbourhood graph, nothing detached, measured best on both axes
    student="clean",
    target="adversarial",
    detach_target=False,
    detach_weights=True,
    # under torchrun: the batch the regulariser's pairwise matrices span. "rank": each process's
    # own rows (per-process batch = global / processes, the neighbourhood size of a single-GPU
    # run at that batch; no extra communication); "global": the features of every process
    # gathered (with gradient), so the loss is the single-process loss on the global batch
    genetic_batch="rank",
    stage2=True,
    stage2_epochs=3,
    stage2_k_fraction=0.2,
    stage2_k=0,  # >0 overrides the fraction
    # names of the Conv2d/Linear modules to fine-tune, given instead of chosen (no scoring, and
    # stage2_k / stage2_k_fraction are ignored), e.g. to compare two selections from one
    # stage-1 model (benchmarks/stage2_selection.py); [] = the k least sensitive layers
    stage2_layers=[],
    stage2_lr=1e-3,
    stage2_weight_decay=8e-4,
    eta=0.1,
    # robust sensitivity (METHOD.md §4.2): the first ascent step (shared by all layers) + one
    # refinement on the leading half of the probe, each step a full radius η‖W‖ (projected).
    # Chosen by agreement with the reference procedure's selection (benchmarks/RESULTS.md):
    # 2 half-radius steps under-estimated ρ on strongly curved layers (run 6); 3 steps with the
    # refinements on a quarter of the probe missed 2 of 4 layers on the ViT (run 8); 2 steps on
    # half the probe pick >= 3 of 4 of the reference's layers on every model scored (run 10)
    sensitivity_steps=2,
    sensitivity_fraction=0.5,  # steps after the first use this leading fraction of the probe
    sensitivity_step=1.0,  # each ascent step's length as a fraction of the radius η‖W‖
    probe_size=512,
    # weight interpolation between stage 1 and stage 2, chosen on validation: on, by the rule
    # that a default is what measures best on the validation split (configs/ablation-small.yaml,
    # 4 seeds: +0.2 clean and +0.1 DAE-robust points; docs/BENCH.md)
    evolution=True,
    evolution_tolerance=0.01,
)

# The authors' reference roles and weights (collapses at this scale: see docs/GENAF.md).
REFERENCE_PRESET = {
    "lam": 20.0,
    "reduction": "sum",
    "space": "logits",
    "student": "clean",
    "target": "adversarial",
    "detach_target": False,
    "detach_weights": False,
    "warmup_epochs": 0,
    "random_start": False,
}


def _forward_parts(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.features(x)
    return feats, model.forward_head(feats)


class HeadWarmup(Stage):
    """Clean cross-entropy on the head only (encoder frozen in eval mode)."""

    name = "warmup"
    select = "last"

    def param_groups(self, model):
        return [ParamGroup("head", head_params(model), self.cfg["warmup_lr"], self.cfg["weight_decay"], 1.0)]

    def set_modes(self, model):
        model.encoder.eval()

    def step(self, model, x, y, ctx):
        with torch.no_grad():
            feats = model.features(x)
        return {"loss": F.cross_entropy(model.forward_head(feats), y)}


def head_warmup_stage(cfg: dict) -> HeadWarmup:
    return HeadWarmup(cfg, cfg["warmup_epochs"])


START_KINDS = ("uniform", "gaussian", "none")
GUARD_ACTIONS = ("fallback", "stop")


def scheduled_budget(cfg: dict, epoch: int) -> tuple[float, float]:
    """The ε schedule shared by every adversarial stage: ``(eps, step)`` at ``epoch``
    (0-based, counted within the adversarial stage).

    ``eps_warmup_epochs`` epochs at ε = 0 (clean training), then ``eps_ramp_epochs`` epochs
    at ε·j/(R+1), j = 1..R (each ramp epoch strictly between 0 and ε; the step size scales
    with ε), then the final ε and step. Both 0 (the default) gives the final values from
    the first epoch, exactly as without a schedule.
    """
    eps, step = cfg["eps"], cfg["attack_step"]
    warm, ramp = int(cfg.get("eps_warmup_epochs", 0)), int(cfg.get("eps_ramp_epochs", 0))
    if epoch < warm:
        return 0.0, 0.0
    if epoch < warm + ramp:
        frac = (epoch - warm + 1) / (ramp + 1)
        return eps * frac, step * frac
    return eps, step


def check_adversarial(cfg: dict) -> None:
    """Validate the options every adversarial method shares (budget, steps, ε schedule)."""
    check_eps(cfg["eps"])
    if cfg["attack_step"] <= 0 or cfg["attack_steps"] < 0:
        raise ConfigError(
            f"attack_step must be > 0 and attack_steps >= 0, got {cfg['attack_step']}, {cfg['attack_steps']}"
        )
    for key in ("eps_warmup_epochs", "eps_ramp_epochs"):
        if cfg.get(key, 0) < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    if cfg.get("start", "uniform") not in START_KINDS:
        raise ConfigError(f"start='{cfg['start']}' is not one of {START_KINDS}")
    if cfg.get("guard_action", "fallback") not in GUARD_ACTIONS:
        raise ConfigError(f"guard_action='{cfg['guard_action']}' is not one of {GUARD_ACTIONS}")
    for key in ("fast_step_factor", "guard_drop", "guard_floor", "guard_size", "guard_steps"):
        if cfg.get(key, 0) < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    if cfg.get("guard_fallback_steps", 1) < 1:
        raise ConfigError(f"guard_fallback_steps must be >= 1, got {cfg['guard_fallback_steps']}")


def pgd_maximise(
    model: nn.Module,
    x: torch.Tensor,
    objective,
    eps: float,
    step: float,
    steps: int,
    start: str = "uniform",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD-L∞ maximising ``objective(x')`` (a scalar) over ``‖x' − x‖∞ ≤ eps`` in [0,1].

    The general form of :func:`genaf.attacks.whitebox.pgd` for objectives other than the
    cross-entropy of labels (TRADES' KL, FARE's feature distance): ``model`` in eval mode
    throughout (previous modes restored), gradients with respect to the input only.
    ``start``: ``uniform`` (U(−ε, ε), drawn as ``pgd`` draws it), ``gaussian`` (0.001·N(0, 1),
    TRADES/MART) or ``none``.
    """
    check_eps(eps)
    x = x.detach()
    with eval_mode(model), frozen_params(model):
        if start == "uniform":
            noise = draw(torch.rand, x.shape, gen).to(x.device, x.dtype)
            xa = (x + (noise * 2 - 1) * eps).clamp(0, 1)
        elif start == "gaussian":
            noise = draw(torch.randn, x.shape, gen).to(x.device, x.dtype)
            xa = torch.min(torch.max(x + 0.001 * noise, x - eps), x + eps).clamp(0, 1)
        else:
            xa = x.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            with torch.enable_grad():
                loss = objective(xa)
            g = input_grad(loss, xa)
            xa = xa.detach() + step * g.sign()
            xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
    return xa.detach()


class Stage1(Stage):
    """PGD adversarial fine-tuning with the genetic regulariser and two optimisers.

    Also the base of every adversarial stage (AT, TRADES, MART, FARE): ``attack`` applies
    the ε schedule (:func:`scheduled_budget`) at the epoch the Trainer announced.

    Fast mode (``attack_steps = 1``): FGSM-RS, a uniform random start in the ε-ball and one
    signed-gradient step of ``fast_step_factor``·ε (Wong et al., "Fast is better than free",
    2020; ``fast_step_factor = 0`` keeps the plain one-step PGD of ``attack_step``). With
    ``guard`` on, ``end_epoch`` runs a PGD-``guard_steps`` check at the training ε on
    ``guard_size`` validation images after every epoch; when its accuracy falls more than
    ``guard_drop`` below its best so far (or below ``guard_floor``) — catastrophic
    overfitting — the stage switches to PGD-``guard_fallback_steps`` for the rest of the run
    (``guard_action = "fallback"``) or ends (``"stop"``). The guard's state lives in the run's
    artefacts (``guard``), so a resumed run continues with the attack it had.
    """

    needs_val_robust = True

    def __init__(self, cfg: dict, epochs: int, name: str = "stage1") -> None:
        super().__init__(cfg, epochs)
        self.name = name
        self.select = cfg.get("select", "clean+robust")
        self._gen = None

    def param_groups(self, model):
        return two_track_groups(model, self.cfg)

    def budget(self) -> tuple[float, float]:
        """This epoch's ``(eps, step)`` under the ε schedule."""
        return scheduled_budget(self.cfg, self.epoch)

    # ------------------------------------------------------------------ fast mode and its guard
    def _guard_state(self, ctx) -> dict | None:
        artifacts = getattr(ctx, "artifacts", None)
        return None if artifacts is None else artifacts.get("guard", {}).get(self.name)

    def fast(self, ctx=None) -> bool:
        """Whether this step uses FGSM-RS (fast mode that the guard has not switched off)."""
        c = self.cfg
        if int(c["attack_steps"]) != 1 or not c.get("fast_step_factor", 0):
            return False
        state = self._guard_state(ctx)
        return not (state and state.get("fallback_epoch"))

    def attack_steps(self, ctx=None) -> int:
        """The number of attack steps now: ``attack_steps``, or ``guard_fallback_steps`` once the
        guard has fallen back from fast mode."""
        c = self.cfg
        k = int(c["attack_steps"])
        if k == 1 and c.get("fast_step_factor", 0) and not self.fast(ctx):
            return int(c["guard_fallback_steps"])
        return k

    def guard_check(self, model, ctx, val: dict | None = None, val_attack: dict | None = None) -> tuple[float, int]:
        """PGD accuracy of the guard: ``(accuracy, images)``. The Trainer's own robust
        validation is reused when it already is at least this check (same ε, at least
        ``guard_steps`` steps, at least ``guard_size`` images); otherwise PGD-``guard_steps``
        at this epoch's ε and step on the first ``guard_size`` validation images."""
        c = self.cfg
        eps, step = self.budget()
        n, steps = int(c["guard_size"]), int(c["guard_steps"])
        va = val_attack or {}
        if (
            val is not None
            and "val_robust" in val
            and abs(float(va.get("eps", -1.0)) - eps) < 1e-9
            and abs(float(va.get("step", -1.0)) - step) < 1e-9
            and int(va.get("steps", 0)) >= steps
            and int(va.get("n", 0)) >= n
        ):
            return float(val["val_robust"]), int(va["n"])
        sub = ctx.data.val.subset(n)
        xs, ys = sub.float_images().to(ctx.device), sub.labels.to(ctx.device)
        team = parallel_of(ctx)  # each process attacks its rows of every batch (their counts summed)
        gen = team.generator(ctx.seed, f"{self.name}:guard")  # the same random starts every epoch
        correct = 0
        for i in range(0, len(xs), 256):
            x, y = xs[i : i + 256], ys[i : i + 256]
            lo, hi = team.set_rows(gen, len(x))
            x, y = x[lo:hi], y[lo:hi]
            xa = pgd(model, x, y, eps, step, steps, random_start=True, gen=gen)
            with torch.no_grad(), eval_mode(model):
                correct += int((model(xa).argmax(1) == y).sum())
        correct = int(team.sum_values({"c": correct})["c"])
        return correct / max(len(xs), 1), len(xs)

    def end_epoch(self, model, ctx, val: dict, val_attack: dict | None = None) -> dict:
        """The Trainer's hook after each epoch's validation (``val_attack``: the ε, step, steps
        and number of images of its robust validation): the fast-mode guard (see the class
        docstring). Returns fields for the epoch's history row (``stop`` ends the stage)."""
        c = self.cfg
        if not c.get("guard", True) or not self.fast(ctx) or getattr(ctx, "data", None) is None:
            return {}
        if self.budget()[0] == 0.0:
            return {}
        acc, n_checked = self.guard_check(model, ctx, val, val_attack)
        state = ctx.artifacts.setdefault("guard", {}).setdefault(self.name, {"best": None, "checks": []})
        eps = self.budget()[0]
        if state.get("eps") is not None and abs(state["eps"] - eps) > 1e-12:
            state["best"] = None  # the ε schedule moved on: accuracies at another ε do not compare
        state["eps"] = eps
        best = state["best"]
        collapsed = (best is not None and acc < best - c["guard_drop"]) or acc < c["guard_floor"]
        state["checks"].append({"epoch": self.epoch + 1, "pgd_acc": acc, "n": n_checked, "collapsed": bool(collapsed)})
        state["best"] = acc if best is None else max(best, acc)
        out = {"guard_pgd_acc": acc}
        if not collapsed:
            return out
        action = c["guard_action"]
        state["fallback_epoch"] = self.epoch + 1
        state["action"] = action
        then = (
            f"switching to PGD-{int(c['guard_fallback_steps'])} training for the rest of the run"
            if action == "fallback"
            else "stopping this stage (the best epoch so far is kept)"
        )
        bar = "!" * 78
        ctx.log(
            f"{bar}\n{self.name}: CATASTROPHIC OVERFITTING in fast (FGSM-RS) mode after epoch {self.epoch + 1}: "
            f"PGD accuracy on {n_checked} validation images {acc:.3f} "
            f"(best so far {state['best']:.3f}, allowed drop {c['guard_drop']}, floor {c['guard_floor']}); "
            f"{then}\n{bar}"
        )
        out["guard_triggered"] = True
        if action == "stop":
            out["stop"] = True
        return out

    # ------------------------------------------------------------------ the attack
    def attacked_model(self, model, ctx):
        """The module the attack runs: the Trainer's BatchNorm-folded copy of ``model``
        (``ctx.attack_fold``, refreshed from ``model``'s current weights and statistics), or
        ``model`` itself. The fold is exact only in eval mode, which every attack of this stage
        runs in (``pgd``/``pgd_maximise``); the training forwards, where BatchNorm runs in train
        mode, always use ``model``."""
        fold = getattr(ctx, "attack_fold", None)
        return fold(model) if fold is not None else model

    def attack(self, model, x, y, ctx, objective=None, start=None, attacked=None):
        """PGD-L∞ at this epoch's budget; ``x`` itself while the schedule holds ε at 0.

        Default: cross-entropy of ``y`` with the ``random_start`` option (exactly
        ``genaf.attacks.whitebox.pgd``). With ``objective`` (a function of x' returning the
        scalar to maximise) or ``start`` (``uniform``/``gaussian``/``none``):
        :func:`pgd_maximise`. Gradients are taken with respect to the input only. In fast
        mode: FGSM-RS (uniform start, one step of ``fast_step_factor``·ε) whatever the start
        options say. The attack runs on :meth:`attacked_model` (``attacked``, when the caller's
        ``objective`` already uses it).
        """
        c = self.cfg
        eps, step = self.budget()
        if eps == 0.0:
            return x.detach()
        if attacked is None:
            attacked = self.attacked_model(model, ctx)
        if self._gen is None:
            self._gen = generator(ctx.seed, f"{self.name}:pgd")
        steps, random_start = self.attack_steps(ctx), c.get("random_start", True)
        if self.fast(ctx):
            step, random_start = float(c["fast_step_factor"]) * eps, True
            start = "uniform" if (objective is not None or start is not None) else None
        if objective is None and start is None:
            return pgd(attacked, x, y, eps, step, steps, random_start=random_start, gen=self._gen)
        if objective is None:

            def objective(xa):
                return F.cross_entropy(attacked(xa), y, reduction="sum")

        start = start or ("uniform" if c.get("random_start", True) else "none")
        return pgd_maximise(attacked, x, objective, eps, step, steps, start=start, gen=self._gen)

    def step(self, model, x, y, ctx):
        c = self.cfg
        lam = float(c.get("lam", 0.0))
        x_adv = self.attack(model, x, y, ctx)
        if lam == 0.0:
            if c.get("clean_forward"):
                with torch.no_grad():
                    model(x)  # only updates BatchNorm statistics with the clean batch
            loss = F.cross_entropy(model(x_adv), y)
            return {"loss": loss, "ce_adv": loss.detach()}
        if c["forward"] == "concat":
            f, z = _forward_parts(model, torch.cat([x, x_adv]))
            (f_c, f_a), (z_c, z_a) = f.chunk(2), z.chunk(2)
        else:
            f_c, z_c = _forward_parts(model, x)
            f_a, z_a = _forward_parts(model, x_adv)
        ce_adv = F.cross_entropy(z_a, y)
        s = F.cross_entropy(z_c, y, reduction="none")
        if c["detach_weights"]:
            s = s.detach()
        space = {"logits": (z_c, z_a), "features": (f_c, f_a)}[c["space"]]
        student = space[0] if c["student"] == "clean" else space[1]
        if c["target"] == "pretrained":
            with torch.no_grad():
                target = ctx.reference_encoder(x)
        else:
            target = space[0] if c["target"] == "clean" else space[1]
            if c["detach_target"]:
                target = target.detach()
        if c.get("genetic_batch", "rank") == "global":  # the global batch's rows, gathered
            team = parallel_of(ctx)
            student, target = team.gather_rows(student, grad=True), team.gather_rows(target, grad=target.requires_grad)
            y, s = team.gather_rows(y), team.gather_rows(s, grad=s.requires_grad)
        reg = genetic_regularizer(student, target, y, s, reduction=c["reduction"])
        return {"loss": ce_adv + lam * reg, "ce_adv": ce_adv.detach(), "genetic": reg.detach()}


def check_stage2_layers(names, model: nn.Module | None = None) -> list[str]:
    """``stage2_layers``: a list of distinct module names, each (given a model) one of its
    Conv2d/Linear layers (:func:`~genaf.methods.sensitivity.weight_units`). Returns the names."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"stage2_layers must be a list of layer names, got {names!r}; "
            "e.g. --set 'stage2_layers=[head.3,head.6]' ([] selects by robust sensitivity)"
        )
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ConfigError(f"stage2_layers names {dup} more than once; name each layer once")
    if model is not None:
        from .sensitivity import weight_units

        units = list(weight_units(model))
        bad = [n for n in names if n not in units]
        if bad:
            raise ConfigError(
                f"stage2_layers: {bad} not among the model's {len(units)} Conv2d/Linear layers "
                f"({', '.join(units[:3])}, ..., {units[-1]}); use those names"
            )
    return list(names)


class Stage2(SelectiveFineTuning):
    """Score every Conv2d/Linear layer, then fine-tune only the k most robust-redundant ones
    on clean data with every other parameter and every BatchNorm statistic frozen; with
    ``evolution``, interpolate with the stage-1 weights (the shared machinery is in
    :mod:`genaf.methods.stage2_common`, which RiFT uses as well). With ``stage2_layers`` the
    named layers are fine-tuned instead, and nothing is scored."""

    name = "stage2"
    label = "stage 2"
    probe_key = "stage2:probe"

    def n_selected(self, n_units: int) -> int:
        c = self.cfg
        return int(c["stage2_k"]) if c["stage2_k"] else max(1, int(c["stage2_k_fraction"] * n_units))

    def setup(self, model, ctx):
        names = self.cfg.get("stage2_layers") or []
        if not names:
            return super().setup(model, ctx)
        self.selected = check_stage2_layers(names, model)
        ctx.log(f"{self.label}: fine-tuning the {len(names)} layers named by stage2_layers: {', '.join(names)}")
        return {"selected": list(self.selected), "k": len(self.selected), "given": True}

    def optimizer(self, params):
        return ParamGroup("selected", params, self.cfg["stage2_lr"], self.cfg["stage2_weight_decay"], 1.0)

    def evolution(self) -> float | None:
        return self.cfg["evolution_tolerance"] if self.cfg["evolution"] else None


@register_method("genaf-stage1")
class GenAFStage1(Method):
    @classmethod
    def default_config(cls):
        return {
            k: v
            for k, v in GENAF_DEFAULTS.items()
            if not k.startswith(("stage2", "evolution", "sensitivity")) and k not in ("eta", "probe_size", "stage2")
        }

    def validate(self):
        c = self.cfg
        check_adversarial(c)
        for key, allowed in (
            ("space", SPACES),
            ("student", STUDENTS),
            ("target", TARGETS),
            ("reduction", ("sum", "mean")),
            ("forward", ("separate", "concat")),
            ("genetic_batch", GENETIC_BATCHES),
        ):
            if c[key] not in allowed:
                raise ConfigError(f"{key}='{c[key]}' is not one of {allowed}")
        if c["target"] == "pretrained" and c["space"] != "features":
            raise ConfigError(
                "target='pretrained' compares with the pre-trained encoder's features: use space='features'"
            )
        if c["lam"] < 0:
            raise ConfigError(f"lam must be >= 0, got {c['lam']}")

    def stages(self):
        c = self.cfg
        out = [head_warmup_stage(c)] if c["warmup_epochs"] > 0 else []
        return out + [Stage1(c, c["epochs"])]


@register_method("genaf")
class GenAF(GenAFStage1):
    @classmethod
    def default_config(cls):
        return dict(GENAF_DEFAULTS)

    def validate(self):
        super().validate()
        check_stage2_layers(self.cfg["stage2_layers"])

    def stages(self):
        out = super().stages()
        if self.cfg["stage2"]:
            out.append(Stage2(self.cfg, self.cfg["stage2_epochs"]))
        return out
