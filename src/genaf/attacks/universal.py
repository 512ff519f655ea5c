"""The common loop of universal (image-agnostic) L∞ attacks crafted on an encoder alone."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import ImageSet
from ..errors import ConfigError
from ..utils import Progress, generator, tensor_hash
from .base import EncoderAttack, eval_mode, input_grad
from .layer_select import AUTO_KEYS, fit_auto
from .perturbation import Perturbation

PROGRESS_LINES = 10  # plain progress lines per crafting run (off a terminal)


def encoder_hash(encoder: nn.Module) -> str:
    return tensor_hash({k: v for k, v in encoder.state_dict().items()})


def layer_modules(encoder: nn.Module, cfg: dict) -> dict:
    """``{"layer_modules": {name: module}}`` for the layer options that are aliases on this encoder
    (a ViT's ``layer2`` is ``blocks.1``, :mod:`genaf.encoders.layout`), so a perturbation records
    the module it was crafted on; ``{}`` when every name is the module's own."""
    resolve = getattr(encoder, "resolve_layer", None)
    names = [cfg.get(k) for k in ("layer", "layer2")]
    names += [n.strip() for n in str(cfg.get("layers") or "").split(",")]
    found = {n: resolve(n) for n in names if resolve and isinstance(n, str) and n and n != "auto"}
    found = {n: m for n, m in found.items() if m != n}
    return {"layer_modules": found} if found else {}


# ---------------------------------------------------------------------- several processes
# ``fit(..., parallel=team)``: the processes of a torchrun run, a ``genaf.distributed.Team`` that
# ``genaf.craft`` passes in. The attacks never touch ``torch.distributed``: they take their rows of
# each batch and add up what they computed with ``team.sum_`` (docs/DISTRIBUTED.md).


def sharing_team(parallel):
    """The team to share a crafting run with, or None for a single process (``parallel`` None or a
    team of one)."""
    return parallel if parallel is not None and getattr(parallel, "distributed", False) else None


def check_rows(team, batch_size: int, n_images: int, name: str) -> None:
    """Every process must hold at least one row of every batch."""
    rows = min(int(batch_size), int(n_images))
    if team is not None and rows < team.world:
        raise ConfigError(
            f"{name}: a batch of {rows} surrogate images cannot be shared by {team.world} processes (each needs "
            f"at least one row); raise batch_size (--set batch_size=...) or start fewer processes"
        )


def mean_over_rows(team, rows: int, value: float, grad: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The whole batch's mean objective and its gradient from each process's mean over its own
    ``rows``: ``Σ_r n_r·v_r / Σ_r n_r`` and ``Σ_r n_r·g_r / Σ_r n_r``, summed in float64 in one
    all-reduce. Exact (up to the order of float additions) for an objective that is a mean over the
    batch's rows of a term of each row, as every sign-step objective here is."""
    buf = torch.cat(
        [
            grad.detach().double().flatten() * rows,
            torch.tensor([float(value) * rows, float(rows)], dtype=torch.float64, device=grad.device),
        ]
    )
    team.sum_(buf)
    total = float(buf[-1])
    return float(buf[-2]) / total, (buf[:-2] / total).view_as(grad).to(grad.dtype)


class UniversalAttack(EncoderAttack):
    """Sign-gradient ascent on one shared δ (‖δ‖∞ ≤ ε) over batches of surrogate images.

    Subclasses implement ``objective(x_adv, x) -> scalar`` (to maximise), a mean over the batch's
    rows of a term of each row. ``fit`` returns a :class:`Perturbation`. Hyper-parameters: ``eps``
    (pixel units), ``step`` (per sign step), ``iterations`` (batches seen), ``batch_size``, ``init``
    ('uniform' or 'zero'), ``seed``.

    ``fit(..., parallel=team)`` (a ``genaf.distributed.Team`` of several processes): every process
    draws δ's start and the batch order from the seed as one process does, takes its rows of every
    batch, computes the objective and its gradient on them, and the row-weighted sums are added up
    across the processes (:func:`mean_over_rows`): the sign step is the one a single process takes on
    the whole batch, and δ is the same on every process.
    """

    name = "universal"
    # How fit uses a team of several processes: "sharded" (each process its rows of every batch)
    # or "replicated" (every process crafts the whole perturbation; genaf.craft keeps rank 0's).
    parallel_mode = "sharded"

    def objective(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_delta(self, shape, gen: torch.Generator) -> torch.Tensor:
        if self.cfg.get("init", "uniform") == "zero":
            return torch.zeros(shape)
        return (torch.rand(shape, generator=gen) * 2 - 1) * self.eps

    def fit(
        self, data: ImageSet, device: str | torch.device = "cpu", surrogate: str = "", log=None, parallel=None
    ) -> Perturbation:
        if any(self.cfg.get(k) == "auto" for k in AUTO_KEYS):
            return fit_auto(self, data, device, surrogate, log, parallel=parallel)
        team = sharing_team(parallel)
        device = torch.device(device)
        gen = generator(self.seed, f"attack:{self.name}")
        c, h, w = data.images.shape[1:]
        delta = self.init_delta((1, c, h, w), gen).to(device)
        step = float(self.cfg["step"])
        iters, bs = int(self.cfg["iterations"]), int(self.cfg["batch_size"])
        check_rows(team, bs, len(data), self.name)
        part = None if team is None else (team.rank, team.world)
        t0, done, history = time.time(), 0, []
        bar = Progress(iters, f"crafting {self.name}", unit="iterations", log=log, lines=PROGRESS_LINES)
        with eval_mode(self.encoder), bar:
            while done < iters:
                batches = data.batches(bs, shuffle=True, gen=gen, device=device, drop_last=len(data) >= bs, part=part)
                for x, _, _ in batches:
                    delta.requires_grad_(True)
                    with torch.enable_grad():
                        obj = self.objective((x + delta).clamp(0, 1), x)
                    g = input_grad(obj, delta)
                    value = float(obj.detach())
                    if team is not None:  # this process's rows -> the whole batch's mean and gradient
                        value, g = mean_over_rows(team, len(x), value, g)
                    delta = (delta.detach() + step * g.sign()).clamp(-self.eps, self.eps)
                    history.append(value)
                    done += 1
                    bar.update(1, f"objective {history[-1]:.4g}")
                    if done >= iters:
                        break
        self.seconds = time.time() - t0
        self.images_seen = iters * bs
        self.history = history
        if log:
            log(f"{self.name}: objective {history[0]:.4g} -> {history[-1]:.4g} in {self.seconds:.1f}s")
        return self.perturbation(delta, surrogate)

    def perturbation(self, delta: torch.Tensor, surrogate: str = "") -> Perturbation:
        """Wrap a fitted δ with everything needed to reproduce and audit it."""
        return Perturbation(
            delta=delta.detach().cpu(),
            kind="additive",
            eps=self.eps,
            attack=self.name,
            config=dict(self.cfg, preset=self.preset, **layer_modules(self.encoder, self.cfg)),
            encoder_hash=encoder_hash(self.encoder),
            encoder_source=str(getattr(self.encoder, "meta", {}).get("source", "")),
            surrogate=surrogate,
            seed=self.seed,
        )

    @torch.no_grad()
    def score(self, delta: torch.Tensor, data: ImageSet, device="cpu", batch_size: int = 256) -> float:
        """The attack's objective for a fixed δ, averaged over ``data`` (for tests and checks)."""
        device = torch.device(device)
        total, n = 0.0, 0
        with eval_mode(self.encoder):
            for x, _, _ in data.batches(batch_size, device=device):
                total += float(self.objective((x + delta.to(device)).clamp(0, 1), x)) * len(x)
                n += len(x)
        return total / max(n, 1)
