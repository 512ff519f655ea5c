"""The pictures explain themselves: perturbation figures (genaf.visualize) and the report's plots
(genaf.bench_report) carry their titles, labels, colour scales, predictions and every seed, and
their error bars lie inside the axes. Drawn from hand-made inputs: fast, no training."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from genaf.attacks.perturbation import Perturbation  # noqa: E402
from genaf.bench_report import (  # noqa: E402
    Group,
    fig_attack_bars,
    fig_sensitivity,
    fig_tradeoff,
    front_section,
    short_layer_names,
)
from genaf.data import ImageSet  # noqa: E402
from genaf.visualize import delta_figure, examples_figure, save_perturbation_images  # noqa: E402

CLASSES = ["zero", "one", "two"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _pert(eps=8 / 255, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(1, 3, 12, 12, generator=g) * 2 - 1) * eps
    return Perturbation(d, eps=eps, attack="ssp-universal", encoder_source="demo")


def _images(n=4):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 3, 12, 12, generator=g) * 255).to(torch.uint8)
    return ImageSet(x, torch.arange(n) % 3, torch.arange(n), split="test", dataset="toy")


class Brightness(torch.nn.Module):
    """Predicts class 0, 1 or 2 from the image's mean brightness: a perturbation can flip it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([-(m - c).abs() for c in (0.45, 0.5, 0.55)], 1) + 0 * self.w


def _texts(ax):
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_perturbation_figures_name_the_attack_budget_encoder_rows_and_scale(tmp_path):
    pert, imgs, model = _pert(), _images(), Brightness()
    fig = examples_figure(pert, imgs, n=4, model=model, class_names=CLASSES, model_name="sft")
    title = fig._suptitle.get_text()
    assert "ssp-universal" in title and "ε = 8/255" in title and "demo" in title
    axes = [a for a in fig.axes if a.images]
    grid = [axes[i * 4 : (i + 1) * 4] for i in range(3)]
    assert grid[0][0].get_ylabel() == "clean" and grid[1][0].get_ylabel() == "perturbed"
    assert grid[2][0].get_ylabel().startswith("δ = perturbed")
    # δ row: a diverging map centred on 0, from −ε to +ε in units of 1/255, with its colour bar
    for ax in grid[2]:
        im = ax.images[0]
        assert im.get_cmap().name == "RdBu_r" and im.get_clim() == pytest.approx((-8.0, 8.0))
    bars = [a for a in fig.axes if not a.images]
    assert len(bars) == 1 and "1/255" in bars[0].get_ylabel()
    # the predictions under the clean and perturbed images are the model's, red where they changed
    x = imgs.float_images()
    pc, pa = model(x).argmax(1).tolist(), model(pert.apply(x)).argmax(1).tolist()
    for j in range(4):
        assert grid[0][j].get_title() == f"true: {CLASSES[int(imgs.labels[j])]}"
        assert grid[0][j].get_xlabel() == f"sft: {CLASSES[pc[j]]}"
        lab = grid[1][j].xaxis.label
        assert lab.get_text() == f"sft: {CLASSES[pa[j]]}"
        assert (lab.get_color() == "tab:red") == (pa[j] != pc[j])
    flips = sum(a != c for a, c in zip(pa, pc))
    assert f"changed on {flips} of 4" in title
    # δ alone: one panel per channel, the same scale
    dfig = delta_figure(pert)
    panels = [a for a in dfig.axes if a.images]
    assert [a.get_title() for a in panels] == ["δ, channel R", "δ, channel G", "δ, channel B"]
    assert all(a.images[0].get_clim() == pytest.approx((-8.0, 8.0)) for a in panels)
    # without a model: no prediction text; the files are PNGs
    plain = examples_figure(pert, imgs, n=4)
    assert all(a.get_xlabel() == "" for a in plain.axes if a.images)
    paths = save_perturbation_images(pert, imgs, tmp_path / "p.safetensors", model=model, class_names=CLASSES)
    assert [p.name for p in paths] == ["p.delta.png", "p.examples.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def _rows():
    """Two seeds, three methods; a noise control, and white-box rows; wide seed spread for sft."""
    table = {  # method: CA per seed, l4a RA per seed, noise RA per seed
        "sft": ((0.90, 0.98), (0.10, 0.30), (0.88, 0.97)),
        "at": ((0.70, 0.72), (0.60, 0.62), (0.69, 0.71)),
        "genaf": ((0.80, 0.82), (0.70, 0.74), (0.79, 0.81)),
    }
    rows = []
    for m, (ca, l4a, noise) in table.items():
        for attack, ra, setting in (
            ("l4a-base", l4a, "dae"),
            ("uniform-noise", noise, "dae"),
            ("pgd1-wb", l4a, "whitebox"),
        ):
            for i, seed in enumerate((0, 1)):
                rows.append(
                    {
                        "encoder": "demo",
                        "dataset": "toy",
                        "method": m,
                        "setting": setting,
                        "attack": attack,
                        "eps": 16 / 255,
                        "seed": seed,
                        "clean_acc": ca[i],
                        "robust_acc": ra[i],
                        "method_name": m,
                        "attack_name": attack,
                    }
                )
    return rows


def _segments_inside(ax):
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    n = 0
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            for lc in c.lines[2]:
                assert isinstance(lc, LineCollection)
                for seg in lc.get_segments():
                    for x, y in seg:
                        assert x0 <= x <= x1 and y0 <= y <= y1, (x, y, ax.get_xlim(), ax.get_ylim())
                        n += 1
    return n


def test_tradeoff_keeps_error_bars_inside_and_marks_the_front_apart_from_genaf():
    rows = [r for r in _rows() if r["setting"] == "dae"]
    g = Group(rows)
    _text, info = front_section(g)
    ax = fig_tradeoff(g, info, "trade-off").axes[0]
    assert _texts(ax) == ("trade-off", "clean accuracy (%)", "mean DAE robust accuracy (%)")
    assert _segments_inside(ax) > 0  # sft's RA spans 10-30 %: its bar must fit
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("front") for t in legend) and "on the front" in legend and "genaf" in legend
    assert "2 seeds" in ax.get_legend().get_title().get_text()
    # Gen-AF is a star, the other methods circles; the front line is black, not a method's colour
    markers = {c.get_label(): c.lines[0].get_marker() for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert markers == {"sft": "o", "at": "o", "genaf": "*"}
    front = [ln for ln in ax.get_lines() if (ln.get_label() or "").startswith("front")]
    assert len(front) == 1 and front[0].get_color() == "black"


def test_attack_bars_show_clean_accuracy_and_the_control_apart():
    rows = _rows()
    g = Group([r for r in rows if r["setting"] == "dae"])
    wb = Group([r for r in rows if r["setting"] == "whitebox"])
    ax = fig_attack_bars(g, "per attack", wb).axes[0]
    assert ax.get_title() == "per attack" and "robust" in ax.get_ylabel()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["l4a-base", "uniform-noise\n(control)", "pgd1-wb\n(white-box)"]
    # one clean-accuracy tick per bar, at each method's clean accuracy
    ca = sorted(round(100 * g.ca(m)[0], 6) for m in g.methods for _ in range(3))
    got = sorted(
        round(float(seg[0][1]), 6)
        for c in ax.collections
        for seg in c.get_segments()
        if len(seg) == 2 and seg[0][1] == seg[1][1]
    )
    assert got == ca
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 3  # the control's bars, one per method
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "clean accuracy of the method" in legend and any("control" in t for t in legend)
    assert ax.get_ylim()[1] >= 100


def test_sensitivity_shows_every_seed_with_short_layer_names():
    names = ["encoder.backbone.conv1", "encoder.backbone.layer1.0.conv1", "encoder.backbone.layer1.0.conv2", "head.0"]
    per_seed = {
        0: {"sensitivity": dict(zip(names, (0.3, 0.1, 0.2, 0.5))), "selected": [names[1]]},
        1: {"sensitivity": dict(zip(names, (0.25, 0.15, 0.1, 0.6))), "selected": [names[2]]},
        7: {"sensitivity": dict(zip(names, (0.2, 0.05, 0.3, 0.4))), "selected": [names[1]]},
    }
    ax = fig_sensitivity(per_seed, "sensitivity").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "head.0"]
    seeds = [c for c in ax.collections if (c.get_label() or "").startswith("seed")]
    assert [c.get_label() for c in seeds] == ["seed 0", "seed 1", "seed 7"]
    for c, s in zip(seeds, per_seed):
        assert len(c.get_offsets()) == len(names)
        filled = [i for i, fc in enumerate(c.get_facecolors()) if fc[3] > 0]
        assert [names[i] for i in filled] == per_seed[s]["selected"]
    assert "ρ" in ax.get_xlabel() and ax.get_title() == "sensitivity"
    # a short name that would clash keeps its full form
    assert short_layer_names(["encoder.head.0", "head.0"]) == {"encoder.head.0": "encoder.head.0", "head.0": "head.0"}


def test_tradeoff_labels_sit_on_the_side_away_from_a_near_point():
    """Two methods at the same clean accuracy, 0.5 points apart in robust accuracy (bench-hard's
    ViT fmnist-500 slice: `at` at 56.7 / 54.9, `genaf-stage1` at 56.7 / 55.4): the higher one's
    name goes above it and the lower one's below, so neither name sits beside the other point."""
    from genaf.bench_report import _label_offset

    pts = [(56.7, 54.9), (56.7, 55.4), (70.5, 55.1)]  # at, genaf-stage1, sft
    span_x, span_y = 30.0, 14.0
    assert [_label_offset(i, pts, span_x, span_y) for i in range(3)] == [(7, -12), (7, 6), (7, 6)]
    # the order of the methods does not decide which is above
    assert [_label_offset(i, pts[::-1], span_x, span_y) for i in range(3)] == [(7, 6), (7, 6), (7, -12)]
    # at the same point, the first above and the second below
    assert [_label_offset(i, [(50.0, 50.0)] * 2, span_x, span_y) for i in (0, 1)] == [(7, 6), (7, -12)]
    # three together: no names (the legend's colours name them)
    assert _label_offset(0, [(50.0, 50.0), (50.5, 50.2), (51.0, 49.8)], span_x, span_y) is None
