"""Self-supervised pre-training of small encoders (SimCLR, BYOL) and k-NN / linear probes.

This is how the project makes its own public-encoder stand-ins for the demo and the tests:
``genaf pretrain --dataset fashion-mnist --method simclr --width 16 --out enc.safetensors`` (the
demo ResNet) or ``genaf pretrain --arch vit-tiny ...`` (genaf's own small ViT).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .augment import ssl_view
from .data import ImageSet, load_dataset
from .encoders.base import DATASET_STATS, Encoder
from .encoders.demo import DEMO_META
from .encoders.files import save_encoder
from .encoders.resnet import build_backbone
from .errors import ConfigError, unknown
from .utils import Progress, generator, seed_everything

SSL_METHODS = ("simclr", "byol")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2n views (mean over views)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE between online predictions and (detached) target projections."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True), nn.Linear(d_hidden, d_out)
    )


@torch.no_grad()
def features(encoder: nn.Module, data: ImageSet, batch_size: int = 512, device="cpu") -> torch.Tensor:
    encoder.eval()
    out = [encoder(x) for x, _, _ in data.batches(batch_size, device=device)]
    return torch.cat(out).float().cpu()


@torch.no_grad()
def knn_accuracy(
    encoder: nn.Module, train: ImageSet, test: ImageSet, k: int = 20, temperature: float = 0.07, device="cpu"
) -> float:
    """Weighted cosine k-NN accuracy (the usual SSL monitor) of an encoder's features."""
    ftr = F.normalize(features(encoder, train, device=device), dim=1)
    fte = F.normalize(features(encoder, test, device=device), dim=1)
    ytr = train.labels.cpu()
    nc = int(max(ytr.max(), test.labels.max())) + 1
    correct = 0
    for i in range(0, len(fte), 1024):
        sim = fte[i : i + 1024] @ ftr.t()
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), nc).scatter_add_(1, ytr[idx], (w / temperature).exp())
        correct += int((votes.argmax(1) == test.labels[i : i + 1024].cpu()).sum())
    return correct / len(test)


def linear_probe_accuracy(
    encoder: nn.Module, train: ImageSet, test: ImageSet, epochs: int = 30, device="cpu", seed: int = 0
) -> float:
    """Accuracy of a logistic-regression head trained on frozen features."""
    ftr, fte = features(encoder, train, device=device), features(encoder, test, device=device)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    nc = int(train.labels.max()) + 1
    torch.manual_seed(seed)
    head = nn.Linear(ftr.shape[1], nc)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    ytr = train.labels.cpu()
    g = generator(seed, "linear-probe")
    for _ in range(epochs):
        perm = torch.randperm(len(ftr), generator=g)
        for i in range(0, len(ftr), 256):
            b = perm[i : i + 256]
            loss = F.cross_entropy(head(ftr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((head(fte).argmax(1) == test.labels.cpu()).float().mean())


def pretrain(
    data: ImageSet,
    meta: dict,
    method: str = "simclr",
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log=print,
    max_seconds: float | None = None,
) -> Encoder:
    """Self-supervised pre-training of the backbone described by ``meta`` on ``data``."""
    if method not in SSL_METHODS:
        raise unknown("pre-training method", method, SSL_METHODS)
    if epochs <= 0 or batch_size < 2:
        raise ConfigError("pre-training needs epochs >= 1 and batch_size >= 2")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ConfigError(f"pre-training needs a positive, finite learning rate (--lr), got {lr}")
    seed_everything(seed)
    device = torch.device(device)
    meta = dict(meta, method=method)
    # channels_last on CUDA only: it is what the GPU kernels want, and on the CPU torch 2.14.1's
    # kernel for a 1x1 stride-2 convolution's backward in channels_last (a ResNet downsample of
    # 4 -> 8 channels, i.e. width 4) corrupts memory on some CPUs (abort, segfault or a hang).
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoder = Encoder(build_backbone(meta), meta).to(device, memory_format=fmt)
    d = encoder.feature_dim
    projector = _mlp(d, 2 * d, d).to(device)
    params = list(encoder.parameters()) + list(projector.parameters())
    if method == "byol":
        predictor = _mlp(d, 2 * d, d).to(device)
        params += list(predictor.parameters())
        target = copy.deepcopy(nn.ModuleList([encoder, projector])).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    steps = epochs * (len(data) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = generator(seed, "pretrain")
    t0, step = time.time(), 0
    # a line per epoch (also on a terminal, where a bar shows the batches of the epoch)
    epochs_bar = Progress(epochs, f"pretraining {method}", unit="epochs", log=log, terminal=False)
    for epoch in range(epochs):
        encoder.train()
        projector.train()
        total, nb = 0.0, 0
        batches_bar = Progress(len(data) // batch_size, f"epoch {epoch + 1}/{epochs}", unit="batches")  # terminal only
        for x, _, _ in data.batches(batch_size, shuffle=True, gen=g, device=device, drop_last=True):
            v1 = ssl_view(x, gen=g).contiguous(memory_format=fmt)
            v2 = ssl_view(x, gen=g).contiguous(memory_format=fmt)
            if method == "simclr":
                loss = nt_xent(projector(encoder(v1)), projector(encoder(v2)), temperature)
            else:
                p1, p2 = predictor(projector(encoder(v1))), predictor(projector(encoder(v2)))
                with torch.no_grad():
                    t1, t2 = target[1](target[0](v1)), target[1](target[0](v2))
                loss = byol_loss(p1, t2) + byol_loss(p2, t1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if method == "byol":
                tau = 1 - (1 - 0.99) * (math.cos(math.pi * step / steps) + 1) / 2
                with torch.no_grad():
                    for pt, po in zip(target.parameters(), list(encoder.parameters()) + list(projector.parameters())):
                        pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
            total += float(loss.detach())
            nb += 1
            batches_bar.update(1)
        batches_bar.close()
        epochs_bar.update(1, f"mean {method} loss {total / max(nb, 1):.4f}")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"pretrain: stopping after epoch {epoch + 1}, time budget of {max_seconds:.0f}s reached")
            break
    epochs_bar.close()
    encoder.meta["pretrain_epochs"] = epoch + 1
    return encoder.eval().cpu().to(memory_format=torch.contiguous_format)


DEMO_RECIPE = {"method": "simclr", "epochs": 12, "batch_size": 256, "lr": 2e-3, "temperature": 0.2, "n_images": 15000}


def pretrain_meta(
    arch: str,
    input_size: int,
    mean,
    std,
    dataset: str,
    width: int = 16,
) -> dict:
    """The metadata of an encoder to pre-train: a genaf ViT (``vit-tiny``, ...; ``width`` unused)
    or the demo's CIFAR-stem ResNet with ``arch`` and ``width``. An image size a ViT cannot take
    (not a multiple of its patch) is refused here, before any work."""
    from .encoders.demo import DEMO_META_VIT
    from .encoders.vit import VIT_ARCHS, check_image_size, vit_meta

    if arch in VIT_ARCHS:
        meta = dict(DEMO_META_VIT, **vit_meta(arch, input_size))
        check_image_size(int(input_size), int(input_size), int(meta["patch_size"]), arch)
    else:
        meta = dict(DEMO_META, arch=arch, width=int(width), input_size=int(input_size))
    meta.update(mean=list(mean), std=list(std), pretrain_dataset=dataset)
    build_backbone(meta)  # an unknown arch or a bad size ends here, in one line
    return meta


def pretrain_demo_encoder(out: str | Path, seed: int = 0, log=print, device="cpu", **overrides) -> dict:
    """Rebuild the demo encoder (SimCLR on Fashion-MNIST training images) and write it to ``out``.

    Returns a report with the k-NN accuracy of the result and of the same architecture with
    random weights on the Fashion-MNIST test split.
    """
    recipe = dict(DEMO_RECIPE, **overrides)
    dm = load_dataset("fashion-mnist", n_train=recipe["n_images"], n_val=1000, seed=seed)
    meta = dict(DEMO_META, pretrain_dataset="fashion-mnist")
    enc = pretrain(
        dm.train,
        meta,
        method=recipe["method"],
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        temperature=recipe["temperature"],
        seed=seed,
        device=device,
        log=log,
    )
    save_encoder(enc, out)
    return probe_report(enc, dm, log=log)


def split_mix(spec: str) -> list[str]:
    """The datasets of a pre-training mix ``a+b`` (one dataset when ``spec`` names no mix). An
    image folder whose path holds a ``+`` and exists is one dataset, not a mix."""
    if spec.startswith("imagefolder:") and Path(spec.split(":", 1)[1]).exists():
        return [spec]
    parts = [p.strip() for p in spec.split("+")]
    if len(parts) > 1 and (any(not p for p in parts) or len(set(parts)) != len(parts)):
        raise ConfigError(f"dataset mix {spec!r}: name each dataset once, e.g. fashion-mnist+rendered-digits")
    return parts


def mix_train(sets: list[ImageSet], seed: int = 0) -> ImageSet:
    """The training images of several datasets as one set, shuffled together (seeded). Labels are
    kept but not used (self-supervised); ``indices`` are each image's index in its own dataset."""
    shapes = {tuple(s.images.shape[1:]) for s in sets}
    if len(shapes) > 1:
        names = ", ".join(f"{s.dataset} {tuple(s.images.shape[1:])}" for s in sets)
        raise ConfigError(f"a pre-training mix needs images of one shape, got {names}; resize with --image-size")
    images = torch.cat([s.images for s in sets])
    order = torch.randperm(len(images), generator=generator(seed, "pretrain-mix"))
    labels = torch.cat([s.labels for s in sets])[order]
    indices = torch.cat([s.indices for s in sets])[order]
    return ImageSet(images[order], labels, indices, "train", "+".join(s.dataset for s in sets))


def image_stats(data: ImageSet, n: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (the first ``n``) images in [0, 1]: the normalisation of an
    encoder pre-trained on a mix, which no single dataset's statistics describe."""
    x = data.images[:n].float().div_(255.0)
    return [round(float(v), 4) for v in x.mean(dim=(0, 2, 3))], [round(float(v), 4) for v in x.std(dim=(0, 2, 3))]


def probe_report(enc: Encoder, dm, log=print, n_train: int = 10000, seed: int = 0) -> dict:
    """k-NN and linear-probe accuracy on the test split, of an encoder and of its architecture with
    random weights (the control the pre-training must beat)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rand = Encoder(build_backbone(enc.meta), dict(enc.meta)).eval()
    train = dm.train.subset(n_train)
    rep = {
        "knn_acc": knn_accuracy(enc, train, dm.test),
        "knn_acc_random_init": knn_accuracy(rand, train, dm.test),
        "linear_probe_acc": linear_probe_accuracy(enc, train, dm.test, epochs=20, seed=seed),
        "linear_probe_acc_random_init": linear_probe_accuracy(rand, train, dm.test, epochs=20, seed=seed),
        "n_train": len(train),
        "n_test": len(dm.test),
    }
    log(
        f"{dm.name} test accuracy: k-NN (k=20) pre-trained {100 * rep['knn_acc']:.1f} % vs random weights "
        f"{100 * rep['knn_acc_random_init']:.1f} %; linear probe {100 * rep['linear_probe_acc']:.1f} % vs "
        f"{100 * rep['linear_probe_acc_random_init']:.1f} %"
    )
    return rep


__all__ = [
    "DATASET_STATS",
    "knn_accuracy",
    "linear_probe_accuracy",
    "split_mix",
    "mix_train",
    "image_stats",
    "nt_xent",
    "byol_loss",
    "pretrain",
    "pretrain_demo_encoder",
    "pretrain_meta",
]
