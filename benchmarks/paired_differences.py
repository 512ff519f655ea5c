"""Paired differences between bench methods, seed by seed, from a bench's ``results.csv``.

For every dataset and method, against a reference method (default ``genaf``) on the same seed:
the difference of clean accuracy and of mean DAE robust accuracy (the universal DAEs of the
``dae`` setting, the uniform-noise control excluded), in points, on the validation split (what
decides) and the test split (reported only); each with its mean and the half-width of a 95 %
t-interval over the seeds. ``genaf report`` (a bench's report.md) prints the same table per
(encoder, dataset) against the bench's genaf run. This is how docs/BENCH.md's ablation table was made:

    python benchmarks/paired_differences.py runs/ablation-small/results.csv --reference genaf
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict

from genaf.bench_report import t_interval as interval

CONTROLS = ("uniform-noise",)


def load(path: str) -> tuple[dict, dict]:
    clean, robust = {}, defaultdict(lambda: {"val": [], "test": []})
    for r in csv.DictReader(open(path, newline="")):
        if r["setting"] != "dae":
            continue
        key = (r["dataset"], r["method"], int(r["seed"]))
        clean[key] = {"val": float(r["val_clean_acc"]), "test": float(r["clean_acc"])}
        if r["attack_name"] in CONTROLS or r["val_robust_acc"] == "":
            continue
        robust[key]["val"].append(float(r["val_robust_acc"]))
        robust[key]["test"].append(float(r["robust_acc"]))
    return clean, robust


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench's results.csv")
    ap.add_argument("--reference", default="genaf", help="the method the others are compared with")
    a = ap.parse_args(argv)
    clean, robust = load(a.results)
    for ds in sorted({k[0] for k in clean}):
        methods = list(dict.fromkeys(k[1] for k in clean if k[0] == ds))
        seeds = sorted({k[2] for k in clean if k[0] == ds and k[1] == a.reference})
        print(f"## {ds}: paired differences from {a.reference}, in points (per seed {seeds}; mean ± 95 %)")
        for m in methods:
            if m == a.reference:
                continue
            parts = []
            for split in ("val", "test"):
                common = [s for s in seeds if (ds, m, s) in clean]
                dc = [100 * (clean[(ds, m, s)][split] - clean[(ds, a.reference, s)][split]) for s in common]
                ref = {s: statistics.mean(robust[(ds, a.reference, s)][split]) for s in common}
                dr = [100 * (statistics.mean(robust[(ds, m, s)][split]) - ref[s]) for s in common]
                (mc, hc), (mr, hr) = interval(dc), interval(dr)
                parts.append(
                    f"{split} CA {' '.join(f'{x:+.1f}' for x in dc)} ({mc:+.1f} ± {hc:.1f}) "
                    f"RA {' '.join(f'{x:+.1f}' for x in dr)} ({mr:+.1f} ± {hr:.1f})"
                )
            print(f"{m:18s} " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
