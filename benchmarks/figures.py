"""Regenerate the example pictures in docs/figures/ from a finished bench folder and a finished demo.

    python benchmarks/figures.py --bench BENCH_DIR --demo DEMO_DIR

``--bench``: runs ``genaf report BENCH_DIR`` (which draws every plot again with the current code)
and copies the plots of its first (encoder, dataset) pair with the DAE setting to
``docs/figures/bench-{tradeoff,attacks,eps,sensitivity}.png``.

``--demo``: draws the demo's pictures again from its files (``genaf.demo.demo_figures``: each
perturbation on the first test images with the fine-tuned SFT model's predictions, and Gen-AF's
layer sensitivity) and copies them to ``docs/figures/demo-*.png``.

The pictures committed now come from the real runs: ``--bench bench-small --demo demo-run-vit``
(configs/bench-small.yaml and ``genaf demo --encoder demo-vit``, 2026-12-07).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "figures"


def bench_figures(bench: Path, dest: Path) -> list[Path]:
    from genaf.bench import merge_shards
    from genaf.bench_report import build_report

    if not merge_shards(bench):
        raise SystemExit(f"{bench}: some shards have not finished")
    report = build_report(bench).read_text()
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", report)
    out = []
    for kind in ("tradeoff", "attacks", "eps", "sensitivity"):
        first = next(
            (
                x
                for x in links
                if Path(x).name.startswith(f"{kind}-") and (kind == "sensitivity" or x.endswith("-dae.png"))
            ),
            None,
        )
        if first is None:
            print(f"no {kind} plot in {bench / 'report.md'}")
            continue
        target = dest / f"bench-{kind}.png"
        shutil.copyfile(bench / first, target)
        out.append(target)
    return out


def demo_figures(demo: Path, dest: Path) -> list[Path]:
    import json

    from genaf.attacks import Perturbation
    from genaf.data import load_dataset
    from genaf.demo import DATASET, SETTINGS
    from genaf.demo import demo_figures as draw

    summary = json.loads((demo / "summary.json").read_text())
    s, seed = summary["settings"], summary["seed"]
    quick = s == SETTINGS["quick"]
    data = load_dataset(DATASET, n_train=s["n_train"], n_val=s["n_val"], n_test=s["n_test"], seed=seed)
    perts = {p.stem: Perturbation.load(p) for p in sorted((demo / "perturbations").glob("*.safetensors"))}
    draw(demo, perts, data, seed, summary.get("encoder", "demo"))
    out = []
    for p in sorted((demo / "perturbations").glob("*.png")):
        target = dest / f"demo-{p.name}"
        shutil.copyfile(p, target)
        out.append(target)
    if (demo / "genaf" / "sensitivity.png").is_file():
        out.append(dest / "demo-sensitivity.png")
        shutil.copyfile(demo / "genaf" / "sensitivity.png", out[-1])
    print(f"demo pictures from {demo} ({'quick' if quick else 'full'} setting, seed {seed})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, help="a finished genaf bench folder (default: none)")
    ap.add_argument("--demo", type=Path, help="a finished genaf demo folder (default: none)")
    ap.add_argument("--out", type=Path, default=DOCS, help=f"where the PNGs go (default {DOCS})")
    a = ap.parse_args()
    if not a.bench and not a.demo:
        ap.error("give --bench DIR, --demo DIR or both")
    a.out.mkdir(parents=True, exist_ok=True)
    written = (bench_figures(a.bench, a.out) if a.bench else []) + (demo_figures(a.demo, a.out) if a.demo else [])
    for p in written:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
