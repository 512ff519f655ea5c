"""Pictures of a perturbation, as PNG figures that explain themselves.

``save_perturbation_images(pert, images, out)`` writes two figures beside ``out``:

- ``<out>.delta.png``: δ itself, one panel per colour channel, on a diverging colour map
  (blue negative, white 0, red positive) with a colour bar in units of 1/255, from −ε to +ε;
- ``<out>.examples.png``: a few images in columns and three labelled rows, *clean*, *perturbed*
  (``clamp(x + δ, 0, 1)``) and *δ = perturbed − clean* (what the image really received after
  clipping to [0, 1]; averaged over the colour channels, same colour scale). With a model and the
  class names, each clean and perturbed image carries the model's prediction; a perturbed one in
  red where the prediction changed.

Both carry a title with the attack, ε as a/255 and the encoder the perturbation was crafted on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .attacks.perturbation import Perturbation
from .data import ImageSet

CMAP = "RdBu_r"
# Perturbations drawn at random, not crafted on an encoder.
RANDOM_CONTROLS = ("uniform-noise",)


def eps_text(eps: float) -> str:
    """ε as ``a/255`` when it is a whole number of 1/255 steps, else the number itself."""
    k = 255 * float(eps)
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-3 else f"{float(eps):.4g}"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(pert: Perturbation, encoder: str | None) -> str:
    if pert.attack in RANDOM_CONTROLS:
        return f"{pert.attack} (random control, no encoder used), ε = {eps_text(pert.eps)}"
    enc = encoder or pert.encoder_source or (pert.encoder_hash[:10] if pert.encoder_hash else "an unnamed encoder")
    budget = (
        f"ε = {eps_text(pert.eps)}"
        if pert.kind == "additive"
        else f"patch on {100 * pert.mask_fraction():.1f} % of the image"
    )
    return f"{pert.attack or 'perturbation'}, {budget}, crafted on encoder {enc}"


def _scale(pert: Perturbation) -> float:
    """The colour bar's half-range in 1/255 units: ε for an additive perturbation, 255 for a patch."""
    return 255.0 * (pert.eps if pert.kind == "additive" else 1.0)


def _show(ax, img: torch.Tensor) -> None:
    """A (C, H, W) [0, 1] image, grey when it has one channel or three equal ones."""
    img = img.detach().float().clamp(0, 1).cpu()
    if img.shape[0] == 1 or bool((img == img[:1]).all()):
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def delta_figure(pert: Perturbation, encoder: str | None = None):
    """The figure of δ itself: one panel per channel, diverging colours in 1/255, ±ε."""
    plt = _plt()
    d = pert.delta[0].detach().float().cpu()
    if pert.kind == "patch" and pert.mask is not None:
        d = d * pert.mask[0].float().cpu()
    else:
        d = d.clamp(-pert.eps, pert.eps)
    lim = _scale(pert)
    names = ["δ"] if d.shape[0] == 1 else [f"δ, channel {c}" for c in ("R", "G", "B")[: d.shape[0]]]
    if d.shape[0] not in (1, 3):
        names = [f"δ, channel {i}" for i in range(d.shape[0])]
    fig, axes = plt.subplots(1, len(names), figsize=(2.3 * len(names) + 1.2, 2.9), squeeze=False)
    im = None
    for ax, ch, name in zip(axes[0], d, names):
        im = ax.imshow((255 * ch).numpy(), cmap=CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        _bare(ax)
    cb = fig.colorbar(im, ax=list(axes[0]), fraction=0.04, pad=0.03)
    cb.set_label("δ (×1/255 of the pixel range)", fontsize=8)
    linf = 255 * float(d.abs().max())
    fig.suptitle(f"{_title(pert, encoder)}\n‖δ‖∞ = {linf:.1f}/255", fontsize=9)
    return fig


def _predict(model, x: torch.Tensor) -> list[int]:
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x.to(dev)).argmax(1).cpu().tolist()
    finally:
        model.train(was)


def examples_figure(
    pert: Perturbation,
    images: ImageSet,
    n: int = 8,
    model=None,
    class_names: list[str] | None = None,
    model_name: str = "model",
    encoder: str | None = None,
):
    """Columns of images, rows clean / perturbed / δ = perturbed − clean (the channel mean, in
    1/255 on the same diverging scale as δ), with ``model``'s predictions when given."""
    plt = _plt()
    x = images.float_images()[:n]
    xa = pert.apply(x)
    n = len(x)
    eff = 255 * (xa - x).mean(1)
    lim = _scale(pert)
    names = list(class_names) if class_names else None

    def name(i: int) -> str:
        return names[i] if names and 0 <= i < len(names) else f"class {i}"

    pc = pa = None
    if model is not None:
        pc, pa = _predict(model, x), _predict(model, xa)
    labels = images.labels[:n].tolist()
    fig, axes = plt.subplots(3, n, figsize=(1.35 * n + 1.6, 5.4), squeeze=False)
    im = None
    for j in range(n):
        _show(axes[0, j], x[j])
        _show(axes[1, j], xa[j])
        im = axes[2, j].imshow(eff[j].cpu().numpy(), cmap=CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
        for r in range(3):
            _bare(axes[r, j])
        if names:
            axes[0, j].set_title(f"true: {name(labels[j])}", fontsize=7)
        if pc is not None:
            ok = pc[j] == labels[j] if names else True
            axes[0, j].set_xlabel(f"{model_name}: {name(pc[j])}", fontsize=7, color="black" if ok else "tab:orange")
            changed = pa[j] != pc[j]
            axes[1, j].set_xlabel(
                f"{model_name}: {name(pa[j])}",
                fontsize=7,
                color="tab:red" if changed else "black",
                fontweight="bold" if changed else "normal",
            )
    mean = " (mean of\nthe channels)" if x.shape[1] > 1 else ""
    for r, text in enumerate(("clean", "perturbed", f"δ = perturbed\n− clean{mean}")):
        axes[r, 0].set_ylabel(text, fontsize=9)
    cb = fig.colorbar(im, ax=list(axes[2]), fraction=0.02, pad=0.01)
    cb.set_label("δ (×1/255)", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    src = f"{images.split} images" + (f" of {images.dataset}" if images.dataset else "")
    sub = f"{n} {src}"
    if pc is not None:
        flips = sum(a != c for a, c in zip(pa, pc))
        sub += f"; {model_name}'s prediction changed on {flips} of {n} (red)"
        if names:
            sub += ", wrong on the clean image in orange"
    fig.suptitle(f"{_title(pert, encoder)}\n{sub}", fontsize=9)
    return fig


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    from .utils import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)


def save_perturbation_images(
    pert: Perturbation,
    images: ImageSet,
    out: str | Path,
    model=None,
    class_names: list[str] | None = None,
    model_name: str = "model",
    encoder: str | None = None,
    n: int = 8,
) -> list[Path]:
    """Write ``<out>.delta.png`` and ``<out>.examples.png`` (see the module's docstring) and
    return their paths. ``model`` (an ``nn.Module`` on [0, 1] images, e.g. ``genaf.load_model``)
    and ``class_names`` add the predictions; ``encoder`` names the encoder in the titles (default:
    the one recorded in the perturbation)."""
    out = Path(out)
    p1 = out.with_suffix(".delta.png")
    save_figure(delta_figure(pert, encoder), p1)
    p2 = out.with_suffix(".examples.png")
    save_figure(examples_figure(pert, images, n, model, class_names, model_name, encoder), p2)
    return [p1, p2]
