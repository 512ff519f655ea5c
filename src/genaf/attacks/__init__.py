"""Downstream-agnostic adversarial examples (crafted on the public encoder) and white-box attacks."""

from .base import attack_names, create_attack, eval_mode, register_attack
from .objects import FGSM, PGD, Universal
from .perturbation import Perturbation
from .whitebox import fgsm, pgd

__all__ = [
    "FGSM",
    "PGD",
    "Universal",
    "Perturbation",
    "attack_names",
    "create_attack",
    "eval_mode",
    "fgsm",
    "pgd",
    "register_attack",
]
