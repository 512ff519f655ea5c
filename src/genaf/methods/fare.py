"""FARE (Schlarmann et al., ICML 2024, "Robust CLIP: Unsupervised Adversarial Fine-Tuning of
Vision Embeddings"; METHOD.md §6), applied to a downstream classifier in two stages.

Stage A (``fare``, unsupervised — labels are never used): per batch, x' = PGD-L∞ maximising
``Σ_i ‖f_θ(x'_i) − f_θ0(x_i)‖²`` (f_θ0 the frozen pre-trained encoder,
``ctx.reference_encoder``; the model in eval mode, gradients with respect to the input only),
then the encoder minimises the batch mean of ``‖f_θ(x') − f_θ0(x)‖²`` (squared L2 summed
over the feature dimension, as in FARE's code). Only the encoder has an optimiser; the
head is untouched. Stage B (``fare-probe``): a head trained on the frozen FARE encoder,
exactly as ``lp`` (encoder in eval mode, clean cross-entropy).

Defaults and fairness: Gen-AF stage 1's PGD (ε 8/255, step 2/255, K = 10, uniform random
start — ``start``), epochs, encoder optimiser (Adam ``encoder_lr`` 1e-4, ``weight_decay``
8e-4, ``gamma`` 0.96) and ε schedule; stage B uses ``lp``'s settings (``probe_epochs`` 10,
``head_lr`` 5e-3, the same weight decay and γ). Deviations: FARE's paper uses ε 2/255 or
4/255 for CLIP, AdamW, and sign steps with momentum 0.9; we use the common budget and the
common sign-PGD so every method faces the same threat model. There is no head warm-up
(stage A never uses the head; stage B trains it), and stage A keeps its last epoch (the head
is untrained there, so validation accuracy cannot select an epoch); stage B selects on
validation clean accuracy like ``lp``.

Fast mode (``attack_steps = 1``, FGSM-RS) runs **without** the catastrophic-overfitting guard of
the supervised stages: that guard measures cross-entropy PGD accuracy through the head, which
stage A never trains, so it would judge a random head. ``guard`` is therefore off for FARE and
asking for it is an error.
"""

from __future__ import annotations

import torch

from .base import Method, ParamGroup, encoder_params, register_method
from .genaf import ADVERSARIAL_DEFAULTS, Stage1, check_adversarial
from .lp import LinearProbe


def fare_loss(feats: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``‖feats_i − target_i‖²`` summed over features, then averaged (or summed) over the batch."""
    per = (feats - target).pow(2).flatten(1).sum(1)
    return per.mean() if reduction == "mean" else per.sum()


class FareStage(Stage1):
    """Unsupervised adversarial fine-tuning of the encoder towards the frozen one's features."""

    select = "last"
    needs_val_robust = False

    def __init__(self, cfg: dict, epochs: int, name: str = "fare") -> None:
        super().__init__(cfg, epochs, name=name)
        self.select = "last"

    def end_epoch(self, model, ctx, val: dict, val_attack: dict | None = None) -> dict:
        """No guard (module docstring): the head is untrained during this stage."""
        return {}

    def param_groups(self, model):
        c = self.cfg
        return [ParamGroup("encoder", encoder_params(model), c["encoder_lr"], c["weight_decay"], c["gamma"])]

    def attack_fare(self, model, x, target, ctx):
        """x' maximising ``Σ_i ‖f_θ(x'_i) − target_i‖²`` (x itself while ε is held at 0), on the
        attacked model (the BatchNorm-folded copy; eval mode)."""
        attacked = self.attacked_model(model, ctx)

        def objective(xa):
            return fare_loss(attacked.features(xa), target, reduction="sum")

        return self.attack(model, x, None, ctx, objective=objective, start=self.cfg["start"], attacked=attacked)

    def step(self, model, x, y, ctx):
        with torch.no_grad():
            target = ctx.reference_encoder(x)
        x_adv = self.attack_fare(model, x, target, ctx)
        loss = fare_loss(model.features(x_adv), target)
        return {"loss": loss, "fare": loss.detach()}


@register_method("fare")
class FARE(Method):
    @classmethod
    def default_config(cls):
        drop = ("warmup_epochs", "warmup_lr", "select")
        base = {k: v for k, v in ADVERSARIAL_DEFAULTS.items() if k not in drop}
        return dict(base, start="uniform", probe_epochs=10, guard=False)

    def validate(self):
        check_adversarial(self.cfg)
        if self.cfg.get("guard"):
            from ..errors import ConfigError

            raise ConfigError(
                "fare has no fast-mode guard: the guard measures cross-entropy PGD accuracy through the head, "
                "which FARE's stage never trains; leave guard off (fast mode then runs unguarded)"
            )

    def stages(self):
        c = self.cfg
        return [FareStage(c, c["epochs"]), LinearProbe(c, c["probe_epochs"], name="fare-probe")]
