"""TRADES (Zhang et al., ICML 2019; METHOD.md §6): ``CE(F(x), y) + β · KL(p(x) ‖ p(x'))``.

Inner maximisation: x' = PGD-L∞ on ``KL(p(x) ‖ p(x'))`` (summed over the batch), with
``p(x)`` the clean prediction of the model in eval mode (the attack itself runs in eval
mode with gradients with respect to the input only), starting from ``x + 0.001·N(0, 1)``
as in TRADES (``start: gaussian``). Outer loss, in train mode with separate clean and
adversarial forwards: clean cross-entropy plus β times the batch-mean KL, the clean
distribution not detached (as in TRADES).

Defaults and fairness: β = 6 (the paper's CIFAR-10 setting, ``beta``). Everything else is
Gen-AF stage 1's (``STAGE1_DEFAULTS``): ε 8/255, step 2/255, K = 10, epochs, the two Adam
optimisers (``encoder_lr``, ``head_lr``, ``weight_decay``, ``gamma``), the clean head
warm-up, checkpoint selection on validation clean + robust accuracy, and the ε schedule
(``eps_warmup_epochs``, ``eps_ramp_epochs``; while ε = 0 the loss is the clean
cross-entropy alone). Deviation: the random start is TRADES' small Gaussian, not the
uniform U(−ε, ε) of stage 1 (``start: uniform`` restores it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks.base import eval_mode
from ..errors import ConfigError
from .base import Method, register_method
from .genaf import ADVERSARIAL_DEFAULTS, Stage1, check_adversarial, head_warmup_stage


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_i KL(p(x_i) ‖ p(x'_i))`` from logits (TRADES' robust term)."""
    return F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="sum") / len(logits_clean)


class TradesStage(Stage1):
    def attack_trades(self, model, x, y, ctx):
        """x' maximising ``Σ_i KL(p(x_i) ‖ p(x'_i))`` (x itself while ε is held at 0); ``p(x)``
        and the attack in eval mode, on the attacked model (the BatchNorm-folded copy)."""
        attacked = self.attacked_model(model, ctx)
        with torch.no_grad(), eval_mode(attacked):
            p_clean = F.softmax(attacked(x), 1)

        def objective(xa):
            return F.kl_div(F.log_softmax(attacked(xa), 1), p_clean, reduction="sum")

        return self.attack(model, x, y, ctx, objective=objective, start=self.cfg["start"], attacked=attacked)

    def step(self, model, x, y, ctx):
        if self.budget()[0] == 0.0:
            loss = F.cross_entropy(model(x), y)
            return {"loss": loss, "ce": loss.detach()}
        x_adv = self.attack_trades(model, x, y, ctx)
        z_c = model(x)
        z_a = model(x_adv)
        ce = F.cross_entropy(z_c, y)
        kl = trades_kl(z_c, z_a)
        return {"loss": ce + self.cfg["beta"] * kl, "ce": ce.detach(), "kl": kl.detach()}


@register_method("trades")
class TRADES(Method):
    @classmethod
    def default_config(cls):
        return dict(ADVERSARIAL_DEFAULTS, beta=6.0, start="gaussian")

    def validate(self):
        check_adversarial(self.cfg)
        if self.cfg["beta"] < 0:
            raise ConfigError(f"beta must be >= 0, got {self.cfg['beta']}")

    def stages(self):
        c = self.cfg
        out = [head_warmup_stage(c)] if c["warmup_epochs"] > 0 else []
        return out + [TradesStage(c, c["epochs"], name="trades")]
