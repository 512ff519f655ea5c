"""Attack objects in the torchattacks style: build once, call on batches.

.. code-block:: python

    model = genaf.load_model("runs/genaf")              # takes [0,1] images, normalises itself
    atk = genaf.attacks.PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True, seed=0)
    adv = atk(images, labels)                           # [0,1] in, [0,1] out, ‖adv − images‖∞ ≤ eps
    adv = genaf.attacks.FGSM(model, eps=8/255)(images, labels)
    adv = genaf.attacks.Universal("ssp.safetensors")(images)   # a DAE file made by genaf attack

:class:`PGD` and :class:`FGSM` are thin wrappers of :func:`genaf.attacks.whitebox.pgd` and
:func:`~genaf.attacks.whitebox.fgsm` (the attacks ``genaf evaluate --whitebox`` runs): the model
is in eval mode during the attack and every module's mode is restored afterwards; no parameter
receives a gradient. The model must take [0,1] images (a genaf model or encoder normalises
inside; wrap another model with its normalisation first). ``seed``: an int gives the object its
own random stream (the same as passing ``torch.Generator().manual_seed(seed)`` to ``pgd``), which
advances from call to call; None draws from torch's global generator, as torchattacks does.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..utils import check_eps
from .perturbation import Perturbation
from .whitebox import fgsm, pgd

__all__ = ["FGSM", "PGD", "Universal"]


def _check_batch(images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"an attack takes a float batch of images (N, C, H, W) in [0, 1], got {got}")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise DataError(
            f"images span [{float(images.min()):.3g}, {float(images.max()):.3g}], not [0, 1]: pass unnormalised "
            "pixels (the model normalises them)"
        )
    if labels is not None and (labels.dim() != 1 or len(labels) != len(images)):
        raise DataError(f"labels must be one class index per image ({len(images)}), got shape {tuple(labels.shape)}")


class _WhiteBox:
    def __init__(self, model: nn.Module, eps: float, seed: int | None) -> None:
        self.model = model
        self.eps = check_eps(eps)
        self.seed = seed
        self.gen = None if seed is None else torch.Generator().manual_seed(int(seed))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict:
        return {"eps": self.eps, "seed": self.seed}


class PGD(_WhiteBox):
    """PGD-L∞ on cross-entropy: ``atk(images, labels) -> adv_images`` (see the module docstring).

    ``alpha`` is the step size, ``steps`` the number of steps, ``random_start`` a uniform start in
    the ε-ball; ``restarts`` > 1 keeps, per image, the first restart that fools the model.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps, seed)
        if not alpha > 0:
            raise ConfigError(f"PGD step alpha must be positive, got {alpha}")
        if int(steps) < 1 or int(restarts) < 1:
            raise ConfigError(f"PGD needs steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}")
        self.alpha, self.steps = float(alpha), int(steps)
        self.random_start, self.restarts = bool(random_start), int(restarts)

    def _options(self) -> dict:
        return {
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "seed": self.seed,
        }

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(images, labels)
        return pgd(
            self.model,
            images,
            labels,
            self.eps,
            self.alpha,
            self.steps,
            random_start=self.random_start,
            restarts=self.restarts,
            gen=self.gen,
        )


class FGSM(_WhiteBox):
    """FGSM: one signed-gradient step of size ``eps`` from the clean image (no randomness)."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255) -> None:
        super().__init__(model, eps, None)

    def _options(self) -> dict:
        return {"eps": self.eps}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(images, labels)
        return fgsm(self.model, images, labels, self.eps)


class Universal:
    """A universal perturbation as an attack object: ``atk(images[, labels]) -> perturbed``.

    ``perturbation`` is a :class:`~genaf.attacks.Perturbation` or the path of a file made by
    ``genaf attack`` (read with its checks: budget, mask, no pickle). Labels are accepted and
    ignored (the perturbation is the same for every image); ``resize='bilinear'`` lets it apply to
    images of another size. ``eps`` is the perturbation's own budget.
    """

    def __init__(self, perturbation: Perturbation | str | os.PathLike, resize: str | None = None) -> None:
        pert = perturbation if isinstance(perturbation, Perturbation) else Perturbation.load(perturbation)
        if resize is not None:
            from .perturbation import RESIZE

            if resize not in RESIZE:
                raise ConfigError(f"resize must be one of {', '.join(RESIZE)}, got '{resize}'")
            pert.resize = resize
        self.perturbation = pert
        self.eps = pert.eps

    def __repr__(self) -> str:
        p = self.perturbation
        return f"Universal(attack={p.attack!r}, kind={p.kind!r}, eps={p.eps:.4g}, resize={p.resize!r})"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_batch(images, labels)
        with torch.no_grad():
            return self.perturbation.apply(images)
