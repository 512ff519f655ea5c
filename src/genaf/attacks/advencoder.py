r"""AdvEncoder (Zhou et al., ICCV 2023): a generator learns one downstream-agnostic perturbation.

A small generator ``G`` turns one fixed, seeded noise vector ``z`` into the perturbation, and
Adam trains ``G`` (never the encoder ``f``) to minimise, over batches of surrogate images,

    loss = α·(−InfoNCE_τ(f(x), f(x')))  +  mean(d²)  −  mean(H_r(d)²),     d = x' − x,

where ``x'`` is the perturbed batch. InfoNCE treats ``(f(x_i), f(x'_i))`` as the positive pair
and every ``f(x'_j)``, j ≠ i, of the batch as a negative, so *raising* it pushes each
adversarial feature away from its own clean feature. ``H_r`` keeps the spatial frequencies
outside a disk of radius ``r`` around the centre of the shifted spectrum: together the last two
terms penalise only the low-frequency energy of the change (by Parseval they sum to
``mean(L_r(d)²)``), steering δ towards high-frequency patterns.

Two registered attacks:

* ``advencoder`` (AdvEncoder-PER): additive δ = ε·tanh(G(z)) (``output="tanh"``, the default)
  or clamp(G(z), −ε, ε) (``output="clip"``, the original's choice), ``x' = clamp(x + δ, 0, 1)``.
* ``advencoder-patch`` (AdvEncoder-PAT): a square patch sigmoid(G(z)) ∈ [0, 1] pasted flush in
  the bottom-right corner, covering ``patch_fraction`` (3 %) of the image:
  ``x' = x·(1 − mask) + δ·mask``. The patch's "budget" is its mask; ``eps`` is unused while
  crafting (it is kept as an option so every attack takes one), and the saved Perturbation
  records ``eps = 1`` (inside the mask a pixel may change by up to 1).

For both, ``d = x' − x`` is the change actually made to each image (δ itself for the additive
attack away from the [0, 1] clamp; ``(patch − x)·mask`` for the patch), as in the original code,
where the two regularisers are MSEs between perturbed and clean images.

Choices of ours:

* Radius: ``radius`` is given for images of side ``radius_size`` (the reference 8 at 64×64). On
  images of another size it scales with the smaller side, ``r = radius·min(H, W)/radius_size``,
  so the same fraction of the spectrum counts as "low" (r = 3.5 on 28×28 Fashion-MNIST, 28 on
  224×224). ``radius_size = 0`` uses ``radius`` as is.
* Generator: a DCGAN-style stack of stride-2 transposed convolutions from a 1×1 ``z`` (``z_dim``
  channels) through ``widths`` channels to the image's channels; its first layer is sized so the
  output covers the image (or patch), and the output is cropped to it. GroupNorm(1, ·) instead
  of BatchNorm: with one ``z`` there is no batch. Weights are drawn from the attack's seeded
  generator, so a seed fixes the result without touching torch's global RNG.
* Length: ``iterations > 0`` runs exactly that many Adam steps (cycling through the data);
  ``iterations = 0`` runs ``epochs`` passes.
* Patch size: side ``round(sqrt(patch_fraction·H·W))`` (3.2 % on 28×28, 2.95 % on 64×64); the
  original floors it and leaves a 14-pixel margin from the corner at 64×64.

``score(delta, data)`` is the attack's objective to maximise, ``−loss`` (all three terms)
averaged over fixed, unshuffled batches of ``data``; ``history`` records it per step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, did_you_mean
from ..utils import Progress, generator
from .base import EncoderAttack, eval_mode, register_attack
from .layer_select import AUTO_KEYS, fit_auto
from .perturbation import MAX_PATCH_FRACTION, Perturbation
from .universal import check_rows, encoder_hash, sharing_team

# --- the plain functions of the objective --------------------------------------------------


def info_nce(anchor: torch.Tensor, other: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE of a batch: row i of ``anchor`` should match row i of ``other`` among all rows.

    Features are flattened per sample and L2-normalised; the logits are the cosine similarities
    divided by ``tau``; the result is the mean cross-entropy of picking the right row.
    """
    a = F.normalize(anchor.flatten(1).float(), dim=1)
    b = F.normalize(other.flatten(1).float(), dim=1)
    logits = a @ b.t() / tau
    target = torch.arange(len(a), device=logits.device)
    return F.cross_entropy(logits, target)


def low_frequency_disk(h: int, w: int, r: float, device=None) -> torch.Tensor:
    """(h, w) bool: True at the frequencies within distance < ``r`` of the centre of the
    ``fftshift``-ed spectrum (the zero frequency sits at row h//2, column w//2)."""
    rows = torch.arange(h, device=device, dtype=torch.float32) - h // 2
    cols = torch.arange(w, device=device, dtype=torch.float32) - w // 2
    dist = torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)
    return dist < r


def high_pass(delta: torch.Tensor, r: float) -> torch.Tensor:
    """Remove the spatial frequencies inside a radius-``r`` disk of the centred spectrum.

    Works on the last two dimensions of a real tensor (…, H, W) and returns a real tensor of the
    same shape. ``r <= 0`` keeps everything; a constant image has only the zero frequency, so any
    ``r > 0`` maps it to 0.
    """
    h, w = delta.shape[-2:]
    keep = (~low_frequency_disk(h, w, r, device=delta.device)).to(torch.complex64)
    spec = torch.fft.fftshift(torch.fft.fft2(delta.float()), dim=(-2, -1))
    spec = torch.fft.ifftshift(spec * keep, dim=(-2, -1))
    return torch.fft.ifft2(spec).real.to(delta.dtype)


def frequency_penalty(change: torch.Tensor, r: float) -> torch.Tensor:
    """``mean(d²) − mean(H_r(d)²)``: the energy of the change minus its high-frequency part."""
    return change.float().pow(2).mean() - high_pass(change, r).float().pow(2).mean()


def advencoder_loss(
    clean_features: torch.Tensor,
    adv_features: torch.Tensor,
    change: torch.Tensor,
    alpha: float = 5.0,
    tau: float = 0.1,
    r: float = 8.0,
) -> torch.Tensor:
    """The loss AdvEncoder minimises: ``α·(−InfoNCE_τ(f(x), f(x'))) + mean(d²) − mean(H_r(d)²)``."""
    return -alpha * info_nce(clean_features, adv_features, tau) + frequency_penalty(change, r)


def effective_radius(radius: float, radius_size: float, h: int, w: int) -> float:
    """``radius`` rescaled from images of side ``radius_size`` to ``min(h, w)`` (as is when 0)."""
    if radius_size and radius_size > 0:
        return float(radius) * min(h, w) / float(radius_size)
    return float(radius)


LOCATIONS = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)  # fmt: skip


def patch_origin(h: int, w: int, side: int, location: str = "bottom-right") -> tuple[int, int]:
    """Top-left pixel (row, column) of a ``side``-pixel square at a named place of an h×w image:
    flush with the named edges, centred along the others (``"center"``: centred on both)."""
    if location not in LOCATIONS:
        raise ConfigError(
            f"unknown patch location '{location}'{did_you_mean(location, LOCATIONS)}; "
            f"choose one of {', '.join(LOCATIONS)}, or auto"
        )
    row = 0 if location.startswith("top") else h - side if location.startswith("bottom") else (h - side) // 2
    col = 0 if location.endswith("left") else w - side if location.endswith("right") else (w - side) // 2
    return row, col


def patch_mask(h: int, w: int, fraction: float = 0.03, location: str = "bottom-right") -> torch.Tensor:
    """(1, 1, h, w) float mask in {0, 1}: a square at ``location`` (see :func:`patch_origin`;
    the bottom-right corner by default) whose side is ``round(sqrt(fraction·h·w))`` (at least 1,
    at most the image's smaller side)."""
    side = patch_side(h, w, fraction)
    r, c = patch_origin(h, w, side, location)
    mask = torch.zeros(1, 1, h, w)
    mask[..., r : r + side, c : c + side] = 1.0
    return mask


def patch_side(h: int, w: int, fraction: float) -> int:
    return max(1, min(h, w, round(math.sqrt(fraction * h * w))))


# --- the generator --------------------------------------------------------------------------


def _widths(value: Any) -> list[int]:
    if isinstance(value, str):
        items = [s for s in value.replace(" ", "").split(",") if s]
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value or [])
    try:
        out = [int(v) for v in items]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"advencoder widths must be channel counts like '64,32', got {value!r}") from exc
    if not out or min(out) < 1:
        raise ConfigError(f"advencoder widths must be one or more positive channel counts, got {value!r}")
    return out


class PerturbationGenerator(nn.Module):
    """``z`` (1, z_dim, 1, 1) → raw map (1, out_channels, h, w), before any squashing.

    The first transposed convolution lifts ``z`` to an ``s × s`` grid with
    ``s = ceil(max(h, w) / 2^len(widths))``; each following one doubles the side; the output is
    cropped to ``h × w``. Weights ~ N(0, 0.02²) (norm gains ~ N(1, 0.02²), biases 0), drawn from
    ``gen``.
    """

    def __init__(self, z_dim: int, widths: list[int], out_channels: int, size: tuple[int, int], gen: torch.Generator):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        start = max(1, math.ceil(max(self.size) / 2 ** len(widths)))
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, widths[0], start, 1, 0, bias=False)]
        layers += [nn.GroupNorm(1, widths[0]), nn.ReLU()]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.GroupNorm(1, cout), nn.ReLU()]
        layers.append(nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.ConvTranspose2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.GroupNorm):
                    m.weight.copy_(1 + torch.randn(m.weight.shape, generator=gen) * 0.02)
                    m.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        return self.net(z)[..., :h, :w]


# --- the attacks ----------------------------------------------------------------------------


@register_attack("advencoder")
class AdvEncoder(EncoderAttack):
    """AdvEncoder-PER: an additive universal δ (‖δ‖∞ ≤ ε) produced by a trained generator.

    Options: ``eps`` (pixel units), ``alpha`` (weight of the InfoNCE term), ``tau`` (InfoNCE
    temperature), ``radius`` and ``radius_size`` (the high-pass radius and the image side it is
    given for), ``lr``, ``beta1``, ``beta2`` (Adam), ``epochs``, ``iterations`` (Adam steps;
    0 = ``epochs`` passes), ``batch_size``, ``z_dim``, ``widths`` (generator channels, e.g.
    '1024,512,256,128'), ``output`` ('tanh' or 'clip'), ``layer`` (features of this encoder
    layer instead of the output; '' = the encoder's features), ``seed``.
    """

    kind = "additive"
    parallel_mode = "sharded"  # under a team: the batches' rows shared, the generator's gradients summed
    presets = {
        # METHOD.md §5: ε 10/255, α 5, τ 0.1, r 8 (at 64×64), Adam 2e-4 β (0.5, 0.999),
        # 20 epochs, batch 256; the original's DCGAN widths and 100-d noise.
        "paper": {
            "eps": 10 / 255,
            "alpha": 5.0,
            "tau": 0.1,
            "radius": 8.0,
            "radius_size": 64,
            "lr": 2e-4,
            "beta1": 0.5,
            "beta2": 0.999,
            "epochs": 20,
            "iterations": 0,
            "batch_size": 256,
            "z_dim": 100,
            "widths": "1024,512,256,128",
            "output": "tanh",
            "layer": "",
            "seed": 0,
        },
        # Same ε and loss; a small generator, a 150× larger Adam step and 20 steps: seconds on a
        # CPU (``epochs`` only counts when ``iterations`` is 0).
        "cpu": {
            "eps": 10 / 255,
            "alpha": 5.0,
            "tau": 0.1,
            "radius": 8.0,
            "radius_size": 64,
            "lr": 3e-2,
            "beta1": 0.5,
            "beta2": 0.999,
            "epochs": 1,
            "iterations": 20,
            "batch_size": 64,
            "z_dim": 16,
            "widths": "32,16",
            "output": "tanh",
            "layer": "",
            "seed": 0,
        },
    }

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        self.alpha = float(cfg.get("alpha", 5.0))
        self.tau = float(cfg.get("tau", 0.1))
        self.radius = float(cfg.get("radius", 8.0))
        self.radius_size = float(cfg.get("radius_size", 64) or 0)
        self.lr = float(cfg.get("lr", 2e-4))
        self.betas = (float(cfg.get("beta1", 0.5)), float(cfg.get("beta2", 0.999)))
        self.epochs = int(cfg.get("epochs", 1))
        self.iterations = int(cfg.get("iterations", 0))
        self.batch_size = int(cfg.get("batch_size", 64))
        self.z_dim = int(cfg.get("z_dim", 16))
        self.widths = _widths(cfg.get("widths", "32,16"))
        self.output = str(cfg.get("output", "tanh"))
        if self.alpha < 0 or not self.tau > 0 or not self.lr > 0:
            raise ConfigError(f"{self.name} wants alpha >= 0, tau > 0, lr > 0; got {self.alpha}, {self.tau}, {self.lr}")
        if self.batch_size < 1 or self.z_dim < 1 or self.epochs < 0 or self.iterations < 0:
            raise ConfigError(
                f"{self.name} wants batch_size >= 1, z_dim >= 1, epochs >= 0, iterations >= 0; got "
                f"{self.batch_size}, {self.z_dim}, {self.epochs}, {self.iterations}"
            )
        if self.output not in ("tanh", "clip"):
            raise ConfigError(f"{self.name} output must be 'tanh' or 'clip', got '{self.output}'")

    # -- what differs between the additive and the patch attack --------------------------
    def generator_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def make_delta(self, raw: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The full-size (1, C, h, w) δ from the generator's raw output."""
        if self.output == "clip":
            return raw.clamp(-self.eps, self.eps)
        return self.eps * torch.tanh(raw)

    def mask(self, h: int, w: int) -> torch.Tensor | None:
        return None

    def perturb(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x'`` exactly as :meth:`Perturbation.apply` makes it."""
        return (x + delta.clamp(-self.eps, self.eps)).clamp(0, 1)

    # -- the objective ---------------------------------------------------------------------
    def radius_for(self, h: int, w: int) -> float:
        return effective_radius(self.radius, self.radius_size, h, w)

    def loss(self, x: torch.Tensor, x_adv: torch.Tensor, clean_features: torch.Tensor | None = None) -> torch.Tensor:
        """AdvEncoder's loss on one batch (call inside eval mode)."""
        if clean_features is None:
            with torch.no_grad():
                clean_features = self.layer_output(x)
        r = self.radius_for(*x.shape[-2:])
        return advencoder_loss(clean_features, self.layer_output(x_adv), x_adv - x, self.alpha, self.tau, r)

    # -- crafting ----------------------------------------------------------------------------
    def shared_loss(self, team, x: torch.Tensor, x_adv: torch.Tensor, clean: torch.Tensor):
        """``(loss, infonce, penalty)``: this process's share of the whole batch's loss (to
        differentiate), the value of the InfoNCE term (the whole batch's) and of this process's
        weighted share of the frequency penalty (summed across the processes by the caller).

        InfoNCE compares every pair of the batch, so the features are gathered (with autograd) and
        the InfoNCE term is computed on the whole batch by every process, divided by the number
        of processes (the gather's backward adds the processes' gradients up); the frequency
        penalty is a mean over rows, weighted by this process's share of the rows. The generator
        gradients of all processes then sum to the gradient of the single-process loss."""
        adv_all = team.gather_rows(self.layer_output(x_adv), grad=True)
        clean_all = team.gather_rows(clean)
        share = len(x) / len(adv_all)
        info = -self.alpha * info_nce(clean_all, adv_all, self.tau)
        penalty = frequency_penalty(x_adv - x, self.radius_for(*x.shape[-2:])) * share
        return info / team.world + penalty, float(info.detach()), float(penalty.detach())

    def fit(
        self, data, device: str | torch.device = "cpu", surrogate: str = "", log=None, parallel=None
    ) -> Perturbation:
        """Train the generator on ``data`` (an ImageSet) and return its δ as a Perturbation.

        ``parallel`` (a team of several processes): each process takes its rows of every batch
        (the batches and the generator's start are drawn from the seed as one process draws them),
        computes its share of the loss (:meth:`shared_loss`), and the generator's gradients are
        summed across the processes before every Adam step, so the generator is the same on every
        process and takes the single-process steps."""
        if any(self.cfg.get(k) == "auto" for k in AUTO_KEYS):
            return fit_auto(self, data, device, surrogate, log, parallel=parallel)
        team = sharing_team(parallel)
        device = torch.device(device)
        gen = generator(self.seed, f"attack:{self.name}")
        c, h, w = (int(s) for s in data.images.shape[1:])
        net = PerturbationGenerator(self.z_dim, self.widths, c, self.generator_size(h, w), gen).to(device)
        z = torch.randn((1, self.z_dim, 1, 1), generator=gen).to(device)
        params = list(net.parameters())
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        bs = self.batch_size
        drop_last = len(data) >= bs
        check_rows(team, bs, len(data), self.name)
        part = None if team is None else (team.rank, team.world)
        per_epoch = len(data) // bs if drop_last else math.ceil(len(data) / bs)
        total = self.iterations if self.iterations > 0 else self.epochs * per_epoch
        t0, done, seen, history = time.time(), 0, 0, []
        bar = Progress(total, f"crafting {self.name}", unit="generator steps", log=log, lines=10)
        with eval_mode(self.encoder), bar:
            while done < total and per_epoch > 0:
                batches = data.batches(bs, shuffle=True, gen=gen, device=device, drop_last=drop_last, part=part)
                for x, _, _ in batches:
                    with torch.no_grad():
                        clean = self.layer_output(x)
                    with torch.enable_grad():
                        delta = self.make_delta(net(z), h, w)
                        x_adv = self.perturb(x, delta)
                        if team is None:
                            loss = self.loss(x, x_adv, clean)
                            value, rows = -float(loss.detach()), len(x)
                        else:
                            loss, info, penalty = self.shared_loss(team, x, x_adv, clean)
                        # gradients for the generator only: the encoder's parameters get no .grad
                        grads = torch.autograd.grad(loss, params, only_inputs=True)
                    if team is not None:  # sum the processes' gradients (and penalty shares, rows)
                        flat = torch.cat([g.detach().double().flatten() for g in grads])
                        extra = torch.tensor([penalty, float(len(x))], dtype=torch.float64, device=flat.device)
                        flat = team.sum_(torch.cat([flat, extra]))
                        value, rows, at, summed = -(info + float(flat[-2])), int(flat[-1]), 0, []
                        for g in grads:
                            summed.append(flat[at : at + g.numel()].view_as(g).to(g.dtype))
                            at += g.numel()
                        grads = summed
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()
                    history.append(value)
                    done += 1
                    seen += rows
                    bar.update(1, f"objective {history[-1]:.4g}")
                    if done >= total:
                        break
            with torch.no_grad():
                delta = self.make_delta(net(z), h, w)
        self.seconds = time.time() - t0
        self.images_seen = seen
        self.history = history
        self.net = net
        if log and history:
            log(f"{self.name}: objective {history[0]:.4g} -> {history[-1]:.4g} in {self.seconds:.1f}s")
        return self.perturbation(delta, surrogate)

    def perturbation(self, delta: torch.Tensor, surrogate: str = "") -> Perturbation:
        """Wrap a δ with everything needed to reproduce and audit it."""
        h, w = delta.shape[-2:]
        mask = self.mask(h, w)
        return Perturbation(
            delta=delta.detach().cpu().float(),
            kind=self.kind,
            eps=self.eps if self.kind == "additive" else 1.0,
            attack=self.name,
            config=dict(self.cfg, preset=self.preset),
            encoder_hash=encoder_hash(self.encoder),
            encoder_source=str(getattr(self.encoder, "meta", {}).get("source", "")),
            surrogate=surrogate,
            seed=self.seed,
            mask=mask,
        )

    @torch.no_grad()
    def score(self, delta: torch.Tensor, data, device="cpu", batch_size: int = 256) -> float:
        """``−loss`` for a fixed full-size δ, averaged (per image) over unshuffled batches of
        ``data`` (InfoNCE's negatives are the other images of each batch). Higher = stronger."""
        device = torch.device(device)
        total, n = 0.0, 0
        with eval_mode(self.encoder):
            for x, _, _ in data.batches(batch_size, device=device):
                total += -float(self.loss(x, self.perturb(x, delta.to(device)))) * len(x)
                n += len(x)
        return total / max(n, 1)


@register_attack("advencoder-patch")
class AdvEncoderPatch(AdvEncoder):
    """AdvEncoder-PAT: a generated patch in [0, 1] pasted at a fixed place of every image.

    Options as ``advencoder`` (``output`` is replaced by a sigmoid) plus ``patch_fraction``, the
    share of the image area the square patch covers, and ``location``: one of
    :data:`LOCATIONS` (the reference's ``bottom-right`` by default) or ``auto``, where the
    attacker crafts one patch per place on most of its surrogate images and keeps the place
    whose patch moves the encoder's features most on the rest (see
    :mod:`genaf.attacks.layer_select`). ``eps`` is not used while crafting.
    """

    kind = "patch"
    extra_keys = ("location_candidates",)
    presets = {
        # paper: the reference's place; cpu: the attacker picks the place (``auto``), the same
        # 3 % area.
        name: {
            **{k: v for k, v in p.items() if k != "output"},
            "patch_fraction": 0.03,
            "location": "bottom-right" if name == "paper" else "auto",
        }
        for name, p in AdvEncoder.presets.items()
    }

    def __init__(self, encoder: nn.Module, preset: str = "cpu", **cfg: Any) -> None:
        super().__init__(encoder, preset, **cfg)
        self.patch_fraction = float(cfg.get("patch_fraction", 0.03))
        if not 0 < self.patch_fraction <= MAX_PATCH_FRACTION:
            raise ConfigError(
                f"patch_fraction must lie in (0, {MAX_PATCH_FRACTION}], got {self.patch_fraction}: a patch over more "
                "of the image is a full-image perturbation (use an additive attack with an ε budget)"
            )
        self.location = str(cfg.get("location", "bottom-right"))
        if self.location != "auto":
            patch_origin(8, 8, 1, self.location)  # refuses an unknown place, listing the known ones

    def generator_size(self, h: int, w: int) -> tuple[int, int]:
        side = patch_side(h, w, self.patch_fraction)
        return side, side

    def make_delta(self, raw: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """sigmoid(G(z)) placed at ``location`` in an otherwise zero (1, C, h, w) map."""
        patch = torch.sigmoid(raw)
        ph, pw = patch.shape[-2:]
        r, c = patch_origin(h, w, ph, self._place())
        return F.pad(patch, (c, w - pw - c, r, h - ph - r))

    def mask(self, h: int, w: int) -> torch.Tensor:
        return patch_mask(h, w, self.patch_fraction, self._place())

    def _place(self) -> str:
        if self.location == "auto":
            raise ConfigError(f"{self.name}: location 'auto' is resolved by fit(); score a patch at a named place")
        return self.location

    def perturb(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self.mask(*x.shape[-2:]).to(device=x.device, dtype=x.dtype)
        return x * (1 - m) + delta.clamp(0, 1) * m
