"""MART (Wang et al., ICLR 2020, "Improving Adversarial Robustness Requires Revisiting
Misclassified Examples"; METHOD.md §6).

Loss on a batch, with ``p = softmax(F(x))`` (train mode) and ``p' = softmax(F(x'))``:

    BCE(p', y) + λ · (1/n) Σ_i KL(p(x_i) ‖ p'(x'_i)) · (1 − p_y(x_i)),
    BCE(p', y) = CE(p', y) − log(1 − max_{k≠y} p'_k)   (boosted CE: the top wrong class)

with the numerical guards of the authors' code (``log(1.0001 − p' + 1e-12)``,
``log(p' + 1e-12)``, ``1.0000001 − p_y``); nothing is detached (the weight ``1 − p_y(x)``
carries gradient, as in the reference). x' = PGD-L∞ on the cross-entropy of ``y``, model
in eval mode, gradients with respect to the input only, from ``x + 0.001·N(0, 1)`` as in
the authors' code (``start: gaussian``).

Defaults and fairness: λ = 5 (``lam``), the value of the authors' ResNet-18 script
(``train_resnet.py``: beta 5.0; their WideResNet-34-10 script uses 6.0). Everything else is
Gen-AF stage 1's (``STAGE1_DEFAULTS``): ε 8/255, step 2/255, K = 10, epochs, the two Adam
optimisers, the clean head warm-up, selection on validation clean + robust accuracy, and the
ε schedule (while ε = 0 the loss is the clean cross-entropy alone). Deviation: the random
start is MART's small Gaussian, not stage 1's U(−ε, ε) (``start: uniform`` restores it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Method, register_method
from .genaf import ADVERSARIAL_DEFAULTS, Stage1, check_adversarial, head_warmup_stage


def mart_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MART's loss from clean and adversarial logits: ``(loss, bce, weighted_kl)`` with
    ``loss = bce + lam · weighted_kl`` (see the module docstring)."""
    p_adv = F.softmax(logits_adv, 1)
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])  # the most likely wrong class
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_nat = F.softmax(logits_clean, 1)
    p_true = p_nat.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)
    weighted = (kl * (1.0000001 - p_true)).sum() / len(y)
    return bce + lam * weighted, bce, weighted


class MartStage(Stage1):
    def step(self, model, x, y, ctx):
        if self.budget()[0] == 0.0:
            loss = F.cross_entropy(model(x), y)
            return {"loss": loss, "ce": loss.detach()}
        x_adv = self.attack(model, x, y, ctx, start=self.cfg["start"])
        loss, bce, kl = mart_loss(model(x), model(x_adv), y, self.cfg["lam"])
        return {"loss": loss, "bce": bce.detach(), "kl": kl.detach()}


@register_method("mart")
class MART(Method):
    @classmethod
    def default_config(cls):
        return dict(ADVERSARIAL_DEFAULTS, lam=5.0, start="gaussian")

    def validate(self):
        check_adversarial(self.cfg)
        if self.cfg["lam"] < 0:
            raise ConfigError(f"lam must be >= 0, got {self.cfg['lam']}")

    def stages(self):
        c = self.cfg
        out = [head_warmup_stage(c)] if c["warmup_epochs"] > 0 else []
        return out + [MartStage(c, c["epochs"], name="mart")]
