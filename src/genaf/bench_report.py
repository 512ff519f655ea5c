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

Plots (``OUT/figures/``): the trade-off front, RA per attack (grouped bars), RA against ε
(with ε = 0 the clean accuracy), the stage-2 robust sensitivity of every layer of a Gen-AF
run with the selected layers marked, and the universal perturbations themselves (the
``*.delta.png`` written beside each perturbation; δ mapped from [−ε, ε] to [0, 1]).
"""

from __future__ import annotations

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


def plot_tradeoff(g: Group, info: dict, title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    cols = _colors(len(g.methods))
    for m, c in zip(g.methods, cols):
        ca, ra = g.ca(m), g.mean_dae(m)
        if ca[0] != ca[0] or ra[0] != ra[0]:
            continue
        ax.errorbar(
            100 * ca[0],
            100 * ra[0],
            xerr=None if ca[1] is None else 100 * ca[1],
            yerr=None if ra[1] is None else 100 * ra[1],
            fmt="o*"[m == genaf_label(g.methods, g.rows)],
            ms=8 if m != genaf_label(g.methods, g.rows) else 14,
            color=c,
            capsize=3,
            label=m,
        )
        ax.annotate(m, (100 * ca[0], 100 * ra[0]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = info["front"]
    if front:
        pts = sorted((info["points"][m] for m in front), key=lambda p: p[0])
        xs, ys = [0.0], [pts[0][1]]
        for i, (x, y) in enumerate(pts):
            xs += [x, x]
            ys += [y, pts[i + 1][1] if i + 1 < len(pts) else 0.0]
        ax.plot(xs, ys, "--", color="grey", lw=1, label=f"front (area {info['area']:.0f} %²)")
    pts = list(info["points"].values())
    if pts:  # zoom on the methods (the front's steps run on to the axes)
        xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
        pad_x = max(2.0, 0.15 * (max(xs_) - min(xs_)))
        pad_y = max(2.0, 0.15 * (max(ys_) - min(ys_)))
        ax.set_xlim(max(0.0, min(xs_) - pad_x), min(100.0, max(xs_) + pad_x))
        ax.set_ylim(max(0.0, min(ys_) - pad_y), min(100.0, max(ys_) + pad_y))
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("mean DAE robust accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    _save(fig, path)


def plot_attack_bars(g: Group, title: str, path: Path, wb: Group | None = None) -> None:
    plt = _plt()
    groups = [("dae", a) for a in g.attacks] + ([("wb", a) for a in wb.attacks] if wb is not None else [])
    n_m = len(g.methods)
    width = 0.8 / max(n_m, 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.4, 0.25 * len(groups) * n_m + 2)), 4.8))
    for i, (m, c) in enumerate(zip(g.methods, _colors(n_m))):
        means, errs = [], []
        for kind, a in groups:
            src = g if kind == "dae" else wb
            ms = mean_std(list(src.expected_per_seed(m, a).values()))
            means.append(100 * ms[0] if ms[0] == ms[0] else 0.0)
            errs.append(0.0 if ms[1] is None else 100 * ms[1])
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(groups))]
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=2, color=c, label=m)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([a + ("\n(white-box)" if k == "wb" else "") for k, a in groups], rotation=30, ha="right")
    ax.set_ylabel("robust accuracy (%), mean over ε and seeds")
    ax.set_xlabel("attack")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method")
    _save(fig, path)


def plot_eps(g: Group, title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    eps_all = sorted({e for _a, e in g.columns})
    for m, c in zip(g.methods, _colors(len(g.methods))):
        xs, ys, es = [0.0], [100 * g.ca(m)[0]], [0.0 if g.ca(m)[1] is None else 100 * g.ca(m)[1]]
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
            es.append(0.0 if ms[1] is None else 100 * ms[1])
        ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", color=c, capsize=3, label=m)
    ax.set_xlabel("DAE budget ε (×1/255, L∞ in pixel units; 0 = clean)")
    ax.set_ylabel("robust accuracy (%), mean over DAE attacks")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), title="method")
    _save(fig, path)


def plot_sensitivity(sens: dict, title: str, path: Path) -> None:
    plt = _plt()
    scores = sens.get("sensitivity") or {}
    selected = set(sens.get("selected") or [])
    names = list(scores)
    vals = [float(scores[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(names) + 2), 4.8))
    colors = ["tab:red" if n in selected else "tab:blue" for n in names]
    ax.bar(range(len(names)), vals, color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_xlabel("layer (Conv2d / Linear)")
    ax.set_ylabel("robust sensitivity ρ (rise of robust CE loss, nats)")
    pos = [v for v in vals if v > 0]
    if pos and len(pos) == len(vals) and max(pos) / min(pos) > 100:
        ax.set_yscale("log")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color="tab:red", label=f"selected for stage 2 ({len(selected)}: most robust-redundant)"),
            Patch(color="tab:blue", label="other layers (kept frozen in stage 2)"),
        ],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


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
    """A bar chart of each Gen-AF-like run's stage-2 sensitivity (first seed with a file)."""
    text = []
    seen = set()
    for r in rows:
        m = r["method"]
        if m in seen or not r.get("run"):
            continue
        f = out / r["run"] / "sensitivity.json"
        if not f.is_file():
            continue
        seen.add(m)
        try:
            sens = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if not sens.get("sensitivity"):
            continue
        slug = _slug(enc, ds, m, "seed", r["seed"])
        plot_sensitivity(
            sens, f"Stage-2 robust sensitivity: {m}, {enc} → {ds}, seed {r['seed']}", figs / f"sensitivity-{slug}.png"
        )
        if not text:
            text += ["### Robust sensitivity of the layers (stage 2)", ""]
        sel = ", ".join(sens.get("selected") or [])
        text += [
            f"{m} (seed {r['seed']}): selected {sel or '—'}.",
            "",
            f"![sensitivity](figures/sensitivity-{slug}.png)",
            "",
        ]
    return text


def _perturbation_section(out: Path, rows: list[dict]) -> list[str]:
    """The universal perturbations of the first seed, as images (δ scaled from [−ε, ε] to [0, 1])."""
    seen, items = set(), []
    for r in rows:
        p = r.get("perturbation")
        if not p or r["setting"] not in ("dae", "self-attack"):
            continue
        key = (r["encoder"], r["attack"], float(r["eps"]), r["setting"] == "self-attack")
        if key in seen or r["setting"] == "self-attack":
            continue
        png = (out / p).with_suffix(".delta.png")
        if png.is_file():
            seen.add(key)
            ex = (out / p).with_suffix(".examples.png")
            items.append((r, png.relative_to(out).as_posix(), ex.relative_to(out).as_posix() if ex.is_file() else None))
    if not items:
        return []
    text = [
        "## Universal perturbations",
        "",
        "δ of each DAE (first seed), mapped from [−ε, ε] to [0, 1] (grey = 0), and test images before and after it.",
        "",
        "| encoder | attack | ε | δ | clean / perturbed |",
        "|---|---|---|---|---|",
    ]
    for r, png, ex in items:
        text.append(
            f"| {r['encoder']} | {r['attack']} | {eps_label(r['eps'])} | ![δ {r['attack']}]({png}) | "
            + (f"![examples]({ex})" if ex else "—")
            + " |"
        )
    return text + [""]


__all__ = ["build_report", "pareto_front", "front_area", "mean_std", "paper_table"]
