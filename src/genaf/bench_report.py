"""``genaf report``: ``report.md`` and PNG plots from a bench folder's ``results.json``.

For every (encoder, dataset) and setting it writes a table in the paper's shape — methods ×
attacks, clean accuracy (CA) and robust accuracy (RA) in percent, ``mean ± std`` over seeds
(sample standard deviation) when there is more than one seed, the best value of each
column in bold — then:

- per-method *expected robustness*: the robust accuracy of each attack averaged over its ε
  grid, and their mean over the DAE attacks;
- the clean–robust trade-off front: each method is a point (CA, mean DAE RA), the front is
  the set of methods no other method beats on both, and its *area* is the area of the
  region of [0, 100]² that the front dominates (the union of the rectangles [0, CA] ×
  [0, RA] of its methods; 10⁴ would be a perfect method);
- whether Gen-AF is on the front: every method with both higher clean accuracy and higher
  mean DAE robust accuracy than ``genaf`` is flagged;
- each method's training budget (epochs and encoder passes per training image).

Every decision (the front, the flags) is made on the **validation** split (``val_clean_acc``,
``val_robust_acc``: downstream training images held out from training, attacked with the same
DAEs); the test split is shown as the final numbers and never used to choose. Rows without
validation numbers (an older genaf) are reported with no decision.

"Mean DAE RA" averages the universal DAE attacks (setting ``dae``) over attacks and ε, per
seed; ``uniform-noise`` is a random control, shown but left out of that mean.

Plots (``OUT/figures/``), each with its title, axis labels and a legend:

- ``tradeoff-*.png``: each method at (validation CA, mean DAE RA) with ± seed-std error bars,
  the front as a black staircase over the grey region it dominates, the methods on it ringed,
  Gen-AF a black-edged star;
- ``attacks-*.png``: RA per attack as grouped bars (mean over ε and seeds, ± std), each
  method's clean accuracy as a black tick over its bars, the DAEs, the random control (hatched)
  and the white-box attacks in separate labelled parts of the axis;
- ``eps-*.png``: RA against ε (ε = 0 is the clean accuracy);
- ``sensitivity-*.png``: stage 2's robust sensitivity of every layer (short names, network
  order), every seed's values as markers (filled where that seed selected the layer);

and beside each perturbation of the first seed (drawn again by every report,
:mod:`genaf.visualize`) ``*.examples.png``, test images clean / perturbed / δ with the
predictions of the SFT model, and ``*.delta.png``, δ per channel, both on a diverging colour
scale in 1/255.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from pathlib import Path

from .utils import atomic_write

CONTROLS = ("uniform-noise",)
SETTING_TITLES = {
    "dae": "DAEs crafted on the original encoder (the threat model)",
    "fresh-head": "Fresh head: the defended encoder frozen, a new linear head trained (lp), same DAEs",
    "self-attack": "Self-attack: DAEs crafted on each defended encoder itself (white-box universal)",
}


# ---------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt(ms: tuple[float, float | None], bold: bool = False, scale: float = 100.0, digits: int = 1) -> str:
    m, s = ms
    if m != m:
        return "—"
    text = f"{scale * m:.{digits}f}" + ("" if s is None else f" ± {scale * s:.{digits}f}")
    return f"**{text}**" if bold else text


def _unique(seq):
    out = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def eps_label(eps: float) -> str:
    k = 255 * float(eps)
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-3 else f"{float(eps):.4g}"


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (x, y) no other point beats on both (strictly better on one, no worse on the other)."""
    front = []
    for n, (x, y) in points.items():
        dominated = any((x2 >= x and y2 >= y and (x2 > x or y2 > y)) for n2, (x2, y2) in points.items() if n2 != n)
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda n: points[n][0])


def front_area(points: list[tuple[float, float]]) -> float:
    """Area of the union of the rectangles [0, x] × [0, y] (the region the points dominate)."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, key=lambda p: -p[0]):  # sweep from the right
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


# ---------------------------------------------------------------------------- aggregation
SPLIT_KEYS = {"test": ("clean_acc", "robust_acc"), "val": ("val_clean_acc", "val_robust_acc")}


def has_validation(rows: list[dict]) -> bool:
    """Whether every row carries its validation numbers (what decisions are made on)."""
    return bool(rows) and all(r.get("val_clean_acc") is not None and r.get("val_robust_acc") is not None for r in rows)


class Group:
    """The rows of one (encoder, dataset, setting) with per-method, per-seed aggregates, on the
    test split (final numbers) or the validation split (``split="val"``: every decision)."""

    def __init__(self, rows: list[dict], split: str = "test") -> None:
        self.split = split
        ck, rk = SPLIT_KEYS[split]
        rows = [{**r, "clean_acc": r.get(ck), "robust_acc": r.get(rk)} for r in rows]
        self.rows = rows
        self.methods = _unique(r["method"] for r in rows)
        self.seeds = _unique(r["seed"] for r in rows)
        self.columns = _unique((r["attack"], float(r["eps"])) for r in rows)
        self.attacks = _unique(r["attack"] for r in rows)
        self.by = {(r["method"], r["attack"], float(r["eps"]), r["seed"]): r for r in rows}
        self.attack_name = {r["attack"]: r.get("attack_name") or r["attack"] for r in rows}

    def is_control(self, attack: str) -> bool:
        return self.attack_name.get(attack, attack) in CONTROLS or attack in CONTROLS

    def dae_attacks(self) -> list[str]:
        return [a for a in self.attacks if not self.is_control(a)]

    def ra(self, method: str, attack: str, eps: float) -> tuple[float, float | None]:
        return mean_std([r["robust_acc"] for (m, a, e, _), r in self.by.items() if (m, a, e) == (method, attack, eps)])

    def clean_per_seed(self, method: str) -> dict:
        out = {}
        for r in self.rows:
            if r["method"] == method:
                out.setdefault(r["seed"], r["clean_acc"])
        return out

    def ca(self, method: str) -> tuple[float, float | None]:
        return mean_std(list(self.clean_per_seed(method).values()))

    def drift(self, method: str) -> tuple[float, float | None]:
        per = {}
        for r in self.rows:
            if r["method"] == method and r.get("drift") is not None:
                per.setdefault(r["seed"], r["drift"])
        return mean_std(list(per.values()))

    def expected_per_seed(self, method: str, attack: str) -> dict:
        """seed -> RA of ``attack`` averaged over its ε grid."""
        per = defaultdict(list)
        for (m, a, _e, s), r in self.by.items():
            if m == method and a == attack:
                per[s].append(r["robust_acc"])
        return {s: sum(v) / len(v) for s, v in per.items()}

    def mean_dae_per_seed(self, method: str) -> dict:
        """seed -> RA averaged over the (attack, ε) cells of every non-control attack."""
        per = defaultdict(list)
        for (m, a, _e, s), r in self.by.items():
            if m == method and not self.is_control(a):
                per[s].append(r["robust_acc"])
        return {s: sum(v) / len(v) for s, v in per.items()}

    def mean_dae(self, method: str) -> tuple[float, float | None]:
        return mean_std(list(self.mean_dae_per_seed(method).values()))


def _best(values: dict[str, float]) -> set[str]:
    finite = {k: v for k, v in values.items() if v == v}
    if not finite:
        return set()
    top = max(finite.values())
    return {k for k, v in finite.items() if abs(v - top) < 1e-12}


# ---------------------------------------------------------------------------- tables
def paper_table(g: Group, wb: Group | None = None) -> str:
    """methods × attacks: CA, RA per (attack, ε), mean DAE RA, white-box RA, drift."""
    cols = [("CA", None)] + [(a, e) for a, e in g.columns]
    wb_cols = list(wb.columns) if wb is not None else []
    cells: dict[tuple, dict[str, tuple]] = {}
    cells[("CA", None)] = {m: g.ca(m) for m in g.methods}
    for a, e in g.columns:
        cells[(a, e)] = {m: g.ra(m, a, e) for m in g.methods}
    cells[("mean", None)] = {m: g.mean_dae(m) for m in g.methods}
    for a, e in wb_cols:
        cells[("wb", a, e)] = {m: wb.ra(m, a, e) for m in g.methods}
    order = cols + [("mean", None)] + [("wb", a, e) for a, e in wb_cols]
    heads = []
    for c in order:
        if c == ("CA", None):
            heads.append("CA")
        elif c == ("mean", None):
            heads.append("mean DAE RA")
        elif c[0] == "wb":
            heads.append(f"RA {c[1]} (white-box, ε {eps_label(c[2])})")
        else:
            heads.append(f"RA {c[0]} (ε {eps_label(c[1])})" + (" [control]" if g.is_control(c[0]) else ""))
    lines = ["| method | " + " | ".join(heads) + " | drift |", "|---|" + "---:|" * (len(order) + 1)]
    bests = {c: _best({m: v[0] for m, v in cells[c].items()}) for c in order}
    for m in g.methods:
        vals = [fmt(cells[c][m], bold=m in bests[c]) for c in order]
        d = g.drift(m)
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {fmt(d, scale=1.0, digits=3)} |")
    return "\n".join(lines)


def expected_table(g: Group) -> str:
    """Expected robustness: RA of each attack averaged over its ε grid, and the mean."""
    atts = g.attacks
    lines = [
        "| method | "
        + " | ".join(f"E[RA] {a} ({len({e for aa, e in g.columns if aa == a})} ε)" for a in atts)
        + " | mean DAE |",
        "|---|" + "---:|" * (len(atts) + 1),
    ]
    vals = {a: {m: mean_std(list(g.expected_per_seed(m, a).values())) for m in g.methods} for a in atts}
    vals["__mean"] = {m: g.mean_dae(m) for m in g.methods}
    bests = {k: _best({m: v[0] for m, v in d.items()}) for k, d in vals.items()}
    for m in g.methods:
        lines.append(
            f"| {m} | "
            + " | ".join(fmt(vals[a][m], m in bests[a]) for a in atts)
            + f" | {fmt(vals['__mean'][m], m in bests['__mean'])} |"
        )
    return "\n".join(lines)


# two-sided 95 % quantiles of Student's t by degrees of freedom; between and past the listed ones the
# next smaller listed degree is used (a slightly wider interval, never a narrower one)
T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval of the mean); the half-width is nan for one value."""
    import statistics

    m = statistics.mean(values)
    if len(values) < 2:
        return m, float("nan")
    df = len(values) - 1
    t = T95[max(k for k in T95 if k <= df)]
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def paired_rows(groups: dict[str, Group], reference: str) -> list[dict]:
    """Per method, the seed-by-seed differences from ``reference`` (same seed) of clean accuracy
    and of mean DAE robust accuracy, in points, on each split of ``groups`` (split -> Group)."""
    out = []
    first = next(iter(groups.values()))
    for m in first.methods:
        if m == reference:
            continue
        row: dict = {"method": m}
        for split, g in groups.items():
            ca_m, ca_r = g.clean_per_seed(m), g.clean_per_seed(reference)
            ra_m, ra_r = g.mean_dae_per_seed(m), g.mean_dae_per_seed(reference)
            seeds = sorted(s for s in g.seeds if s in ca_m and s in ca_r and s in ra_m and s in ra_r)
            row[split] = {
                "seeds": seeds,
                "clean": [100 * (ca_m[s] - ca_r[s]) for s in seeds],
                "robust": [100 * (ra_m[s] - ra_r[s]) for s in seeds],
            }
        out.append(row)
    return out


def paired_table(groups: dict[str, Group], reference: str) -> str:
    """Markdown: each method minus ``reference``, seed by seed, with the mean and its 95 %
    t-interval, for clean accuracy and mean DAE RA on each split (validation decides)."""

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        mean, half = t_interval(values)
        each = " ".join(f"{v:+.1f}" for v in values)
        return f"{each} (**{mean:+.1f}** ± {half:.1f})" if half == half else f"{each} (**{mean:+.1f}**)"

    names = {"val": "validation", "test": "test"}
    heads = [f"{what} ({names.get(split, split)})" for split in groups for what in ("Δ CA", "Δ mean DAE RA")]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for row in paired_rows(groups, reference):
        cells = [cell(row[split][k]) for split in groups for k in ("clean", "robust")]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def genaf_label(methods: list[str], rows: list[dict]) -> str | None:
    if "genaf" in methods:
        return "genaf"
    for r in rows:
        if r.get("method_name") == "genaf":
            return r["method"]
    return None


def front_section(g: Group, test: Group | None = None) -> tuple[str, dict]:
    """The clean–robust front of ``g`` (the validation group: the front is a decision) with the
    test numbers of ``test`` as the final columns, reported and not used."""
    points = {m: (100 * g.ca(m)[0], 100 * g.mean_dae(m)[0]) for m in g.methods}
    points = {m: p for m, p in points.items() if p[0] == p[0] and p[1] == p[1]}
    front = pareto_front(points)
    area = front_area([points[m] for m in front])
    split = "validation" if g.split == "val" else "test"
    extra = " test CA | test mean DAE RA |" if test is not None else ""
    lines = [
        f"| method | {split} CA | {split} mean DAE RA | on the front | dominated area |{extra}",
        "|---|---:|---:|:---:|---:|" + ("---:|---:|" if test is not None else ""),
    ]
    for m in g.methods:
        if m not in points:
            continue
        x, y = points[m]
        tail = f" {100 * test.ca(m)[0]:.1f} | {100 * test.mean_dae(m)[0]:.1f} |" if test is not None else ""
        lines.append(f"| {m} | {x:.1f} | {y:.1f} | {'yes' if m in front else ''} | {x * y:.0f} |{tail}")
    text = [
        "\n".join(lines),
        "",
        f"Decided on the {split} split: area under the clean–robust front (CA × mean DAE RA, in %², of at most "
        f"10000): **{area:.0f}** (front: {', '.join(front) or '—'})."
        + (" The test columns are reported only; no choice uses them." if test is not None else ""),
    ]
    gl = genaf_label(g.methods, g.rows)
    dominating = []
    if gl is not None and gl in points:
        gx, gy = points[gl]
        dominating = [m for m in g.methods if m != gl and m in points and points[m][0] > gx and points[m][1] > gy]
        if dominating:
            text.append(
                f"**FLAG: {', '.join(dominating)} beat{'s' if len(dominating) == 1 else ''} `{gl}` on both {split} "
                f"clean accuracy and {split} mean DAE robust accuracy: `{gl}` is not on the front.**"
            )
        else:
            text.append(f"No method beats `{gl}` on both {split} clean accuracy and {split} mean DAE robust accuracy.")
    info = {"split": split, "front": front, "area": area, "points": points, "dominating_genaf": dominating}
    return "\n".join(text), info


def budget_table(rows: list[dict]) -> str:
    """Each method's training budget: epochs (every stage together) and encoder passes per
    training image (forward or forward+backward, attack steps included), mean over seeds."""
    methods = _unique(r["method"] for r in rows)
    lines = ["| method | epochs | encoder passes per training image |", "|---|---:|---:|"]
    for m in methods:
        per = {}
        for r in rows:
            if r["method"] == m:
                per.setdefault(r["seed"], (r.get("total_epochs"), r.get("passes_per_image")))
        ep = [v[0] for v in per.values() if v[0] is not None]
        pa = [v[1] for v in per.values() if v[1] is not None]
        e = f"{sum(ep) / len(ep):g}" if ep else "—"
        p = f"{sum(pa) / len(pa):.1f}" if pa else "—"
        lines.append(f"| {m} | {e} | {p} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    def w(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    atomic_write(path, w)
    _plt().close(fig)


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _err(ms: tuple[float, float | None]) -> float:
    return 0.0 if ms[1] is None else 100 * ms[1]


def _label_offset(i: int, points: list[tuple[float, float]], span_x: float, span_y: float):
    """Where the trade-off figure writes the name of the method at ``points[i]``, in offset points
    from it; None for no label. Alone: above right. Near one other point (within 8 % of the plotted
    width and 5 % of its height): on the side away from it, above right when it is the higher of
    the two (the first of two at the same height) and below right otherwise, so that each name
    sits beside its own point. Near two or more: none, the legend's colour names it."""
    x, y = points[i]
    near = [
        j for j, (a, b) in enumerate(points) if j != i and abs(x - a) < 0.08 * span_x and abs(y - b) < 0.05 * span_y
    ]
    if len(near) >= 2:
        return None
    if not near:
        return (7, 6)
    b = points[near[0]][1]
    return (7, 6) if y > b or (y == b and i < near[0]) else (7, -12)


def fig_tradeoff(g: Group, info: dict, title: str):
    """Each method at (CA, mean DAE RA) with its seed std as error bars, the front as a black
    staircase over the grey region it dominates, the methods on the front ringed, and Gen-AF a
    large black-edged star. The axes hold every error bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.4, 5.0))
    gl = genaf_label(g.methods, g.rows)
    front = info["front"]
    if front:
        pts = sorted((info["points"][m] for m in front), key=lambda p: p[0])
        xs, ys = [0.0], [pts[0][1]]
        for i, (x, y) in enumerate(pts):
            xs += [x, x]
            ys += [y, pts[i + 1][1] if i + 1 < len(pts) else 0.0]
        ax.fill_between(xs, ys, 0, color="0.85", zorder=0, label=f"dominated by the front (area {info['area']:.0f} %²)")
        ax.plot(xs, ys, "-", color="black", lw=1.3, zorder=1, label="front (no method beats these on both)")
    lo_x, hi_x, lo_y, hi_y = [], [], [], []
    ringed = False
    # nearness is judged against the plotted range (error bars and padding included, as the zoom
    # below sets it), which is what a label's size on the page compares with
    boxes = [(100 * g.ca(m)[0], 100 * g.mean_dae(m)[0], _err(g.ca(m)), _err(g.mean_dae(m))) for m in g.methods]
    boxes = [bx for bx in boxes if bx[0] == bx[0] and bx[1] == bx[1]]
    points = [(bx[0], bx[1]) for bx in boxes]  # in the order of the loop below

    def _plotted(lo: list[float], hi: list[float]) -> float:
        return max(1.0, max(hi) - min(lo) + 2 * max(2.0, 0.12 * (max(hi) - min(lo)))) if lo else 1.0

    span_x = _plotted([x - ex for x, _, ex, _ in boxes], [x + ex for x, _, ex, _ in boxes])
    span_y = _plotted([y - ey for _, y, _, ey in boxes], [y + ey for _, y, _, ey in boxes])
    for m, c in zip(g.methods, _colors(len(g.methods))):
        ca, ra = g.ca(m), g.mean_dae(m)
        if ca[0] != ca[0] or ra[0] != ra[0]:
            continue
        x, y, ex, ey = 100 * ca[0], 100 * ra[0], _err(ca), _err(ra)
        star = m == gl
        ax.errorbar(
            x,
            y,
            xerr=ex or None,
            yerr=ey or None,
            fmt="*" if star else "o",
            ms=17 if star else 8,
            mec="black" if star else c,
            mew=1.2 if star else 1.0,
            color=c,
            ecolor=c,
            capsize=3,
            zorder=4 if star else 3,
            label=f"{m} (Gen-AF)" if star and m != "genaf" else m,
        )
        if m in front:
            ax.scatter(
                [x],
                [y],
                s=420 if star else 240,
                facecolors="none",
                edgecolors="black",
                lw=1.2,
                zorder=2,
                label=None if ringed else "on the front",
            )
            ringed = True
        off = _label_offset(len(lo_x), points, span_x, span_y)  # lo_x: one entry per point plotted so far
        if off is not None:
            ax.annotate(m, (x, y), textcoords="offset points", xytext=off, fontsize=8, zorder=5)
        lo_x.append(x - ex)
        hi_x.append(x + ex)
        lo_y.append(y - ey)
        hi_y.append(y + ey)
    if lo_x:  # zoom on the methods and their error bars (the front's steps run on to the axes)
        pad_x = max(2.0, 0.12 * (max(hi_x) - min(lo_x)))
        pad_y = max(2.0, 0.12 * (max(hi_y) - min(lo_y)))
        ax.set_xlim(max(0.0, min(lo_x) - pad_x), min(100.0, max(hi_x) + pad_x))
        ax.set_ylim(max(0.0, min(lo_y) - pad_y), min(100.0, max(hi_y) + pad_y))
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("mean DAE robust accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    seeds = len(g.seeds)
    note = f"error bars: ± sample std over {seeds} seeds" if seeds > 1 else "one seed: no error bars"
    if ax.get_legend_handles_labels()[0]:  # (no universal DAE but the noise control: nothing plotted)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), title=note, title_fontsize=8)
    return fig


def plot_tradeoff(g: Group, info: dict, title: str, path: Path) -> None:
    _save(fig_tradeoff(g, info, title), path)


def fig_attack_bars(g: Group, title: str, wb: Group | None = None):
    """Grouped bars: each method's RA per attack (mean over ε and seeds, ± std over seeds), its
    clean accuracy as a black tick over each of its bars; the DAEs first, then the random
    control (hatched, its own panel of the axis), then the white-box attacks."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    dae = [a for a in g.attacks if not g.is_control(a)]
    ctrl = [a for a in g.attacks if g.is_control(a)]
    groups = [("dae", a) for a in dae] + [("control", a) for a in ctrl]
    groups += [("wb", a) for a in wb.attacks] if wb is not None else []
    n_m = len(g.methods)
    width = 0.8 / max(n_m, 1)
    fig, ax = plt.subplots(figsize=(min(18.0, max(7.0, 0.22 * len(groups) * n_m + 3)), 5.0))
    top = 100.0
    for i, (m, c) in enumerate(zip(g.methods, _colors(n_m))):
        ca = 100 * g.ca(m)[0]
        for j, (kind, a) in enumerate(groups):
            src = wb if kind == "wb" else g
            ms = mean_std(list(src.expected_per_seed(m, a).values()))
            if ms[0] != ms[0]:
                continue
            x = j - 0.4 + width * (i + 0.5)
            h, e = 100 * ms[0], _err(ms)
            ax.bar(
                x,
                h,
                width,
                yerr=e or None,
                capsize=2,
                error_kw={"ecolor": "0.45", "lw": 1.0},
                color=c,
                alpha=0.45 if kind == "control" else 1.0,
                hatch="//" if kind == "control" else None,
                edgecolor="0.3" if kind == "control" else c,
                lw=0.5,
            )
            if ca == ca:
                ax.hlines(ca, x - width / 2, x + width / 2, colors="black", lw=2.2, zorder=3)
            top = max(top, h + e, ca if ca == ca else 0.0)
    kinds = [k for k, _ in groups]
    bounds = [j for j in range(1, len(groups)) if kinds[j] != kinds[j - 1]]
    for b in bounds:
        ax.axvline(b - 0.5, color="0.4", ls=":", lw=1)
    names = {"dae": "universal DAEs (crafted on θ0)", "control": "random control", "wb": "white-box"}
    starts = [0] + bounds
    ends = bounds + [len(groups)]
    for s, e in zip(starts, ends):
        ax.text(
            (s + e - 1) / 2,
            1.01,
            names[kinds[s]],
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.25",
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        [a + {"dae": "", "control": "\n(control)", "wb": "\n(white-box)"}[k] for k, a in groups],
        rotation=30,
        ha="right",
    )
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("accuracy (%): bars robust, mean over ε and seeds")
    ax.set_xlabel("attack")
    ax.set_ylim(0, max(100.0, top + 2))
    ax.set_title(title, fontsize=10, pad=20)
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=c, label=m) for m, c in zip(g.methods, _colors(n_m))]
    handles += [
        Line2D([], [], color="black", lw=2.2, label="clean accuracy of the method"),
        Patch(facecolor="0.8", edgecolor="0.3", hatch="//", label="control: random noise of the same ε"),
    ]
    seeds = len(g.seeds)
    note = f"error bars (grey): ± std over {seeds} seeds" if seeds > 1 else "one seed"
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title=note, title_fontsize=8)
    return fig


def plot_attack_bars(g: Group, title: str, path: Path, wb: Group | None = None) -> None:
    _save(fig_attack_bars(g, title, wb), path)


def fig_eps(g: Group, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    eps_all = sorted({e for _a, e in g.columns})
    top = 100.0
    for m, c in zip(g.methods, _colors(len(g.methods))):
        xs, ys, es = [0.0], [100 * g.ca(m)[0]], [_err(g.ca(m))]
        for e in eps_all:
            per = defaultdict(list)
            for (mm, a, ee, s), r in g.by.items():
                if mm == m and ee == e and not g.is_control(a):
                    per[s].append(r["robust_acc"])
            if not per:
                continue
            ms = mean_std([sum(v) / len(v) for v in per.values()])
            xs.append(255 * e)
            ys.append(100 * ms[0])
            es.append(_err(ms))
        ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", color=c, capsize=3, label=m)
        top = max([top] + [y + e for y, e in zip(ys, es) if y == y])
    ax.set_xlabel("DAE budget ε (×1/255, L∞ in pixel units; 0 = clean)")
    ax.set_ylabel("robust accuracy (%), mean over DAE attacks")
    ax.set_ylim(0, max(100.0, top + 2))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    seeds = len(g.seeds)
    note = f"error bars: ± std over {seeds} seeds" if seeds > 1 else "one seed"
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), title=note, title_fontsize=8)
    return fig


def plot_eps(g: Group, title: str, path: Path) -> None:
    _save(fig_eps(g, title), path)


def short_layer_names(names: list[str]) -> dict[str, str]:
    """Layer name -> a shorter one for plots: the wrapper prefixes ``encoder.`` and ``backbone.``
    dropped (``encoder.backbone.layer2.0.conv1`` -> ``layer2.0.conv1``); a name that would then
    clash with another keeps its full form."""
    short = {}
    for n in names:
        s = n
        for p in ("encoder.", "backbone.", "model.", "module."):
            if s.startswith(p) and len(s) > len(p):
                s = s[len(p) :]
        short[n] = s
    counts = defaultdict(int)
    for s in short.values():
        counts[s] += 1
    return {n: (s if counts[s] == 1 else n) for n, s in short.items()}


SEED_MARKERS = "osD^vP<>Xph"


def fig_sensitivity(per_seed: dict, title: str):
    """Stage-2 robust sensitivity ρ of every layer (rows, in network order) for every seed:
    a marker per seed (filled where that seed selected the layer), a bar at the mean over seeds
    (red where at least one seed selected the layer), and ``k/n`` where k of n seeds did."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    seeds = list(per_seed)
    layers = _unique(n for s in seeds for n in (per_seed[s].get("sensitivity") or {}))
    short = short_layer_names(layers)
    sel = {s: set(per_seed[s].get("selected") or []) for s in seeds}
    n_sel = {n: sum(n in sel[s] for s in seeds) for n in layers}
    fig, ax = plt.subplots(figsize=(8.0, max(3.2, 0.24 * len(layers) + 1.6)))
    means = []
    for n in layers:
        vals = [float(per_seed[s]["sensitivity"][n]) for s in seeds if n in (per_seed[s].get("sensitivity") or {})]
        means.append(sum(vals) / len(vals))
    ys = list(range(len(layers)))
    ax.barh(ys, means, height=0.7, color=["tab:red" if n_sel[n] else "tab:blue" for n in layers], alpha=0.3)
    cols = _colors(len(seeds))
    allv = []
    for k, (s, c) in enumerate(zip(seeds, cols)):
        sc = per_seed[s].get("sensitivity") or {}
        pts = [(float(sc[n]), i, n in sel[s]) for i, n in enumerate(layers) if n in sc]
        allv += [v for v, _, _ in pts]
        mk = SEED_MARKERS[k % len(SEED_MARKERS)]
        ax.scatter(
            [v for v, _, _ in pts],
            [i for _, i, _ in pts],
            marker=mk,
            s=30,
            facecolors=[c if chosen else "none" for _, _, chosen in pts],
            edgecolors=[c] * len(pts),
            lw=1.1,
            zorder=3,
            label=f"seed {s}",
        )
    pos = [v for v in allv if v > 0]
    if pos and len(pos) == len(allv) and max(pos) / min(pos) > 100:
        ax.set_xscale("log")
    for i, n in enumerate(layers):
        if n_sel[n] and len(seeds) > 1:
            ax.annotate(
                f"{n_sel[n]}/{len(seeds)}",
                (1.0, i),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="tab:red",
            )
    ax.set_yticks(ys)
    ax.set_yticklabels([short[n] for n in layers], fontsize=8)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # the first layer at the top
    ax.set_xlabel("robust sensitivity ρ (rise of the robust CE loss, nats)")
    ax.set_ylabel("layer (Conv2d / Linear), input to output")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ks = sorted({len(v) for v in sel.values()})
    handles = [
        Line2D([], [], marker=SEED_MARKERS[k % len(SEED_MARKERS)], ls="", color=c, mfc="none", label=f"seed {s}")
        for k, (s, c) in enumerate(zip(seeds, cols))
    ]
    handles += [
        Line2D([], [], marker="o", ls="", color="0.3", mfc="0.3", label="filled: selected by that seed"),
        Patch(color="tab:red", alpha=0.3, label="mean ρ, selected by k/n seeds" if len(seeds) > 1 else "ρ, selected"),
        Patch(color="tab:blue", alpha=0.3, label="mean ρ, never selected" if len(seeds) > 1 else "ρ, not selected"),
    ]
    ax.legend(
        handles=handles,
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.06, 1.0),
        title=f"the {'/'.join(map(str, ks))} layer(s) of least ρ (robust-\nredundant) are fine-tuned, the rest frozen",
        title_fontsize=8,
    )
    return fig


def plot_sensitivity(per_seed: dict, title: str, path: Path) -> None:
    """``per_seed``: seed -> the contents of a run's ``sensitivity.json``."""
    _save(fig_sensitivity(per_seed, title), path)


# ---------------------------------------------------------------------------- the report
def _slug(*parts) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(str(p) for p in parts)).strip("-")


def build_report(out_dir: str | os.PathLike) -> Path:
    """Write ``OUT/report.md`` and ``OUT/figures/*.png`` from ``OUT/results.json``; returns the report path."""
    from .bench import read_results

    out = Path(out_dir)
    res = read_results(out)
    rows = res["rows"]
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    title = res.get("name") or "genaf bench"
    text = [f"# {title}", ""]
    seeds = _unique(r["seed"] for r in rows)
    text += [
        f"{len(rows)} result rows; seeds {', '.join(map(str, seeds))}. Accuracies in percent"
        + (", mean ± sample std over seeds" if len(seeds) > 1 else "")
        + "; the best value of each column in bold. CA: clean accuracy; RA: robust accuracy; "
        "drift: relative encoder weight drift ‖θ−θ0‖/‖θ0‖ (DAEs are crafted on θ0, so a model far from it "
        "may look robust for that reason alone: compare with the high-learning-rate SFT control). "
        "Mean DAE RA averages the universal DAEs over attacks and ε (controls such as uniform-noise excluded).",
        "",
    ]
    summary: dict = {}
    if not rows:
        text.append("No results yet.")
    pairs = _unique((r["encoder"], r["dataset"]) for r in rows)
    for enc, ds in pairs:
        sub = [r for r in rows if (r["encoder"], r["dataset"]) == (enc, ds)]
        text += [f"## {enc} → {ds}", ""]
        wb_rows = [r for r in sub if r["setting"] == "whitebox"]
        wb = Group(wb_rows) if wb_rows else None
        settings = _unique(r["setting"] for r in sub if r["setting"] != "whitebox")
        if not settings and wb is not None:
            settings = []
            text += ["### White-box only", "", paper_table(wb), ""]
        for setting in settings:
            srows = [r for r in sub if r["setting"] == setting]
            g = Group(srows)
            slug = _slug(enc, ds, setting)
            t = f"{enc} → {ds} ({setting})"
            text += [f"### {SETTING_TITLES.get(setting, setting)}", ""]
            if has_validation(srows):
                gv = Group(srows, "val")
                wbv = Group(wb_rows, "val") if wb is not None and has_validation(wb_rows) else None
                text += [
                    "**Validation split** (downstream training images held out from training; DAEs crafted from the "
                    "surrogate reserve). Every decision of this report — the front, the flags — is made on these:",
                    "",
                    paper_table(gv, wbv if setting == "dae" else None),
                    "",
                ]
                sec, info = front_section(gv, g)
                plot_tradeoff(gv, info, f"Clean–robust trade-off (validation): {t}", figs / f"tradeoff-{slug}.png")
            else:
                text += [
                    "**No validation numbers in these rows** (results of an older genaf): no decision is made below; "
                    "rerun `genaf bench` to record them.",
                    "",
                ]
                sec, info = front_section(g)
                info["split"] = "test (no validation numbers: reported, not decided)"
                plot_tradeoff(g, info, f"Clean–robust trade-off (test): {t}", figs / f"tradeoff-{slug}.png")
            summary[f"{enc}/{ds}/{setting}"] = info
            text += [
                "**Test split** (final numbers; no choice uses them):",
                "",
                paper_table(g, wb if setting == "dae" else None),
                "",
            ]
            text += [
                "Expected robustness (test; RA of each attack averaged over its ε grid):",
                "",
                expected_table(g),
                "",
            ]
            ref = genaf_label(g.methods, srows)
            if ref is not None and len(g.seeds) > 1 and len(g.methods) > 1:
                groups = {"val": Group(srows, "val"), "test": g} if has_validation(srows) else {"test": g}
                text += [
                    f"Paired differences from `{ref}`, in points: each method minus `{ref}` on the same seed "
                    f"(seeds {', '.join(map(str, sorted(g.seeds)))}, in that order), then the mean and the "
                    "half-width of its 95 % t-interval. An interval that excludes 0 is a difference beyond seed "
                    "noise; validation decides, test confirms:",
                    "",
                    paired_table(groups, ref),
                    "",
                ]
            text += ["Clean–robust trade-off:", "", sec, ""]
            text += [
                "Training budget of each method (a gain that is only more training shows here):",
                "",
                budget_table(srows),
                "",
            ]
            plot_attack_bars(
                g,
                f"Robust accuracy per attack (test): {t}",
                figs / f"attacks-{slug}.png",
                wb if setting == "dae" else None,
            )
            plot_eps(g, f"Robust accuracy against ε (test): {t}", figs / f"eps-{slug}.png")
            text += [
                f"![trade-off front](figures/tradeoff-{slug}.png)",
                f"![robust accuracy per attack](figures/attacks-{slug}.png)",
                f"![robust accuracy against eps](figures/eps-{slug}.png)",
                "",
            ]
        text += _sensitivity_section(out, sub, enc, ds, figs)
    text += _perturbation_section(out, rows)
    path = out / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(text).rstrip() + "\n"))
    summary_path = out / "report-summary.json"
    atomic_write(summary_path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    return path


def _sensitivity_section(out: Path, rows: list[dict], enc: str, ds: str, figs: Path) -> list[str]:
    """For each method whose runs wrote ``sensitivity.json`` (Gen-AF's stage 2, RiFT): one
    chart of every layer's robust sensitivity with every seed on it."""
    per_method: dict[str, dict] = {}
    for r in rows:
        m = r["method"]
        if not r.get("run") or r["seed"] in per_method.get(m, {}):
            continue
        f = out / r["run"] / "sensitivity.json"
        if not f.is_file():
            continue
        try:
            sens = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(sens, dict) and isinstance(sens.get("sensitivity"), dict) and sens["sensitivity"]:
            per_method.setdefault(m, {})[r["seed"]] = sens
    if not per_method:
        return []
    text = ["### Robust sensitivity of the layers (stage 2)", ""]
    for m, per_seed in per_method.items():
        slug = _slug(enc, ds, m)
        seeds = ", ".join(map(str, per_seed))
        plot_sensitivity(
            per_seed, f"Robust sensitivity of each layer: {m}, {enc} → {ds}", figs / f"sensitivity-{slug}.png"
        )
        short = short_layer_names(_unique(n for sv in per_seed.values() for n in sv["sensitivity"]))
        sel = "; ".join(
            f"seed {s}: " + (", ".join(short.get(n, n) for n in sv.get("selected") or []) or "—")
            for s, sv in per_seed.items()
        )
        text += [
            f"{m} (seeds {seeds}), the layers fine-tuned: {sel}.",
            "",
            f"![sensitivity of {m}](figures/sensitivity-{slug}.png)",
            "",
        ]
    return text


def _prediction_run(rows: list[dict], r: dict) -> dict | None:
    """The run whose predictions a perturbation's examples show: SFT's for the same encoder,
    dataset and seed when the bench has it, else the first method's."""
    same = [
        x
        for x in rows
        if x.get("run")
        and x["setting"] == "dae"
        and (x["encoder"], x["dataset"], x["seed"]) == (r["encoder"], r["dataset"], r["seed"])
    ]
    by_label = [x for x in same if x["method"] == "sft"]
    by_name = [x for x in same if x.get("method_name") == "sft"]
    return (by_label or by_name or same or [None])[0]


def _redraw_perturbations(out: Path, rows: list[dict], items: list[tuple[dict, Path]]) -> dict:
    """Draw each perturbation's figures again: δ from its file, and the examples on the first
    test images of the row's dataset with the predictions of :func:`_prediction_run`'s model.
    Returns ``{perturbation path: (dataset, method)}`` of the examples drawn, and under the key
    ``None`` why some could not be (the bench's own pictures, on surrogate images, then stay)."""
    from .attacks.perturbation import Perturbation
    from .errors import GenafError
    from .models import load_model
    from .visualize import delta_figure, save_figure, save_perturbation_images

    drawn: dict = {}
    bench = cfg = None
    try:
        from .bench import Bench, load_config

        cfg = load_config(out / "bench.yaml")
        cfg.device = "cpu"
        bench = Bench(cfg, out, log=lambda *_: None)
    except (GenafError, OSError) as exc:
        drawn[None] = f"the bench configuration could not be read ({exc})"
    # the bench has read these images already: a report never downloads them
    specs = {d.label: dataclasses.replace(d, download=False) for d in cfg.datasets} if cfg is not None else {}
    models: dict = {}
    for r, path in items:
        try:
            pert = Perturbation.load(path)
        except (GenafError, OSError):
            continue
        if cfg is not None and cfg.surrogate.get("resize") == "bilinear":
            pert.resize = "bilinear"
        dm = None
        if bench is not None and r["dataset"] in specs:
            try:
                dm = bench.data(specs[r["dataset"]], r["seed"])
            except (GenafError, OSError) as exc:
                drawn[None] = f"the images of {r['dataset']} could not be read ({exc})"
        run = _prediction_run(rows, r)
        model = None
        if dm is not None and run is not None:
            key = run["run"]
            if key not in models:
                try:
                    models[key] = load_model(out / key)
                except (GenafError, OSError):
                    models[key] = None
            model = models[key]
        if dm is not None:
            name = run["method"] if model is not None else None
            try:
                save_perturbation_images(
                    pert,
                    dm.test.subset(8),
                    path,
                    model=model,
                    class_names=dm.classes,
                    model_name=name or "model",
                    encoder=r["encoder"],
                )
                drawn[path] = (r["dataset"], name)
                continue
            except GenafError as exc:
                drawn[None] = f"{path.name} could not be applied to the images of {r['dataset']} ({exc})"
        save_figure(delta_figure(pert, r["encoder"]), path.with_suffix(".delta.png"))
    return drawn


def _perturbation_section(out: Path, rows: list[dict]) -> list[str]:
    """The universal perturbations of the first seed, drawn again (visualize): δ and, on test
    images, clean / perturbed / δ with a fine-tuned model's predictions."""
    seen, items = set(), []
    for r in rows:
        p = r.get("perturbation")
        if not p or r["setting"] != "dae":
            continue
        key = (r["encoder"], r["attack"], float(r["eps"]))
        path = out / p
        if (
            key in seen
            or path.suffix != ".safetensors"
            or not (path.is_file() or path.with_suffix(".delta.png").is_file())
        ):
            continue
        seen.add(key)
        items.append((r, path))
    if not items:
        return []
    drawn = _redraw_perturbations(out, rows, items)
    text = [
        "## Universal perturbations",
        "",
        "Each DAE of the first seed. The first figure shows test images in columns: clean, perturbed (clamped to "
        "[0, 1]) and δ = perturbed − clean (mean of the colour channels), on a diverging colour scale in units of "
        "1/255 from −ε to +ε; under each image the prediction of a fine-tuned model (SFT where the bench has it), "
        "in red where the perturbation changed it. The second shows δ itself, one panel per colour channel.",
        "",
    ]
    if drawn.get(None):
        text += [
            f"Some examples were not drawn again: {drawn[None]}; those show the bench's pictures from crafting time "
            "(surrogate images, no predictions).",
            "",
        ]
    for r, path in items:
        rel = path.relative_to(out)
        ex, de = rel.with_suffix(".examples.png"), rel.with_suffix(".delta.png")
        where = drawn.get(path)
        on = (
            f" — test images of {where[0]}" + (f", predictions of {where[1]} (seed {r['seed']})" if where[1] else "")
            if where
            else ""
        )
        how = "random control" if (r.get("attack_name") or r["attack"]) in CONTROLS else f"crafted on {r['encoder']}"
        text += [f"### {r['attack']}, ε {eps_label(r['eps'])}, {how}{on}", ""]
        if (out / ex).is_file():
            text.append(f"![clean / perturbed / δ: {r['attack']}]({ex.as_posix()})")
        if (out / de).is_file():
            text.append(f"![δ of {r['attack']}]({de.as_posix()})")
        text.append("")
    return text


__all__ = ["build_report", "pareto_front", "front_area", "mean_std", "paper_table"]
