r"""A surrogate classification head for label-based attacks that only see the encoder.

Attacks such as UAP (DeepFool steps) or the clipped cross-entropy of SGD-UAP need class scores,
but a downstream-agnostic attacker holds the encoder ``f`` alone. :func:`fit_surrogate_head`
builds a linear head ``h`` on ``f``'s features of the surrogate images, so that ``h(f(x))`` is a
stand-in classifier:

* ``kind="kmeans"``: seeded k-means (k-means++ start) on the standardised features gives
  pseudo-labels, and the head is trained on (features, pseudo-labels). The attacker needs no
  labels at all.
* ``kind="probe"``: the same head trained on the surrogate data's own labels (``data.labels``);
  its number of classes is ``max(label) + 1`` and ``n_classes`` is ignored.

Features are standardised (per-dimension mean and std of the surrogate features, kept inside the
head as buffers) before both k-means and the head. In that space the k-means cells are exactly
linearly separable (``argmin_k ‖z − c_k‖² = argmax_k 2c_k·z − ‖c_k‖²``), so a linear head can
reproduce the pseudo-labels. Training is full-batch Adam from a zero initialisation: with the
seeded k-means it makes the whole fit deterministic for a fixed seed. The returned head is in
eval mode with ``requires_grad=False`` on its parameters, so attacks never leave a gradient in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, unknown
from ..utils import generator
from .base import eval_mode

HEAD_KINDS = ("kmeans", "probe")


class SurrogateHead(nn.Module):
    """``logits = W·(z − μ)/σ + b`` on encoder features ``z``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())
        self.linear = nn.Linear(mean.numel(), n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.kind = ""
        self.n_classes = int(n_classes)
        self.train_accuracy = float("nan")

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.float() - self.mean) / self.std

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(feats))


@torch.no_grad()
def encoder_features(encoder: nn.Module, data, device="cpu", batch_size: int = 256) -> torch.Tensor:
    """The encoder's features of every image of an ImageSet, in order, as float32 (N, D)."""
    device = torch.device(device)
    out = []
    with eval_mode(encoder):
        for x, _, _ in data.batches(batch_size, device=device):
            out.append(encoder(x).float().flatten(1))
    if not out:
        raise ConfigError("a surrogate head needs at least one surrogate image")
    return torch.cat(out)


def kmeans_pp_init(feats: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first centre uniformly, each next one with probability ∝ D²."""
    n = feats.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [feats[first]]
    d2 = (feats - feats[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            weights = (d2 / total).double().cpu()
        else:  # every point coincides with a centre already: any point will do
            weights = torch.ones(n, dtype=torch.float64)
        pick = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(feats[pick])
        d2 = torch.minimum(d2, (feats - feats[pick]).pow(2).sum(1))
    return torch.stack(centres)


def assign(feats: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean distance) for every row of ``feats``."""
    d2 = feats.pow(2).sum(1, keepdim=True) - 2 * feats @ centres.T + centres.pow(2).sum(1)
    return d2.argmin(1)


def kmeans(feats: torch.Tensor, k: int, gen: torch.Generator, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a k-means++ start drawn with ``gen``.

    Returns ``(centres (k, D), labels (N,))``. Stops early once the assignment no longer changes;
    a cluster that empties keeps its previous centre.
    """
    feats = feats.float()
    if feats.dim() != 2:
        raise ConfigError(f"kmeans wants (N, D) features, got {tuple(feats.shape)}")
    n = feats.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"kmeans needs 1 <= k <= number of points, got k={k} for {n} points")
    centres = kmeans_pp_init(feats, k, gen)
    labels = assign(feats, centres)
    for _ in range(max(int(iters), 0)):
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, feats)
        filled = counts > 0
        centres = centres.clone()
        centres[filled] = sums[filled] / counts[filled].unsqueeze(1).to(feats.dtype)
        new = assign(feats, centres)
        if torch.equal(new, labels):
            break
        labels = new
    return centres, labels


def train_linear_head(
    feats: torch.Tensor, targets: torch.Tensor, n_classes: int, steps: int = 200, lr: float = 0.05
) -> SurrogateHead:
    """Full-batch Adam on the cross-entropy of a zero-initialised :class:`SurrogateHead`."""
    mean = feats.mean(0)
    std = feats.std(0, unbiased=False).clamp_min(1e-6)
    head = SurrogateHead(mean, std, n_classes).to(feats.device)
    z = head.standardise(feats).detach()
    targets = targets.to(feats.device).long()
    opt = torch.optim.Adam(head.linear.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(max(int(steps), 0)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head.linear(z), targets).backward()
            opt.step()
    with torch.no_grad():
        head.train_accuracy = float((head.linear(z).argmax(1) == targets).float().mean())
    for p in head.parameters():
        p.grad = None
        p.requires_grad_(False)
    return head.eval()


def fit_surrogate_head(
    encoder: nn.Module,
    data,
    kind: str = "kmeans",
    n_classes: int = 10,
    seed: int = 0,
    device="cpu",
    kmeans_iters: int = 50,
    steps: int = 200,
    lr: float = 0.05,
    batch_size: int = 256,
) -> SurrogateHead:
    """A linear head on ``encoder``'s features of ``data`` (an ImageSet), mapping features to logits.

    ``kind="kmeans"``: pseudo-labels from seeded k-means with ``n_classes`` clusters;
    ``kind="probe"``: ``data.labels``. Deterministic for a fixed ``seed`` (on a given device).
    """
    if kind not in HEAD_KINDS:
        raise unknown("surrogate head", kind, HEAD_KINDS)
    feats = encoder_features(encoder, data, device, batch_size)
    if kind == "kmeans":
        gen = generator(int(seed), "surrogate-head:kmeans")
        mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
        _, targets = kmeans(((feats - mean) / std).cpu(), int(n_classes), gen, kmeans_iters)
        k = int(n_classes)
    else:
        targets = data.labels.long().cpu()
        if targets.numel() and int(targets.min()) < 0:
            raise ConfigError("a probe surrogate head needs non-negative integer labels")
        k = int(targets.max()) + 1
    head = train_linear_head(feats, targets.to(feats.device), k, steps=steps, lr=lr)
    head.kind = kind
    return head


def head_logits(encoder: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The surrogate classifier's logits ``h(f(x))``."""
    return head(encoder(x))


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean_i (max_{j≠y_i} z_ij − z_{i,y_i})``: positive for a sample once its prediction left ``y_i``."""
    z = logits.float()
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    other = z.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return (other - true).mean()


def head_for_attack(attack, data, device="cpu") -> SurrogateHead:
    """The surrogate head an attack's options ask for (``head``, ``head_classes``,
    ``head_images``): shared by ``uap`` and ``sgd-uap --set objective=clipped-ce``."""
    n = int(attack.cfg.get("head_images") or 0)
    return fit_surrogate_head(
        attack.encoder,
        data.subset(n) if n > 0 else data,
        kind=attack.cfg.get("head", "kmeans"),
        n_classes=int(attack.cfg.get("head_classes", 10)),
        seed=attack.seed,
        device=device,
    )
