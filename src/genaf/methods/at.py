"""PGD adversarial fine-tuning (Madry AT): Gen-AF stage 1 with the regulariser off.

Every option, the head warm-up and the ε schedule (``eps_warmup_epochs``,
``eps_ramp_epochs``) are Gen-AF stage 1's (``STAGE1_DEFAULTS``).
"""

from __future__ import annotations

from .base import Method, register_method
from .genaf import STAGE1_DEFAULTS, Stage1, check_adversarial, head_warmup_stage


@register_method("at")
class AT(Method):
    @classmethod
    def default_config(cls):
        return dict(STAGE1_DEFAULTS)

    def validate(self):
        check_adversarial(self.cfg)

    def stages(self):
        cfg = dict(self.cfg, lam=0.0)
        out = [head_warmup_stage(cfg)] if cfg["warmup_epochs"] > 0 else []
        return out + [Stage1(cfg, cfg["epochs"], name="at")]
