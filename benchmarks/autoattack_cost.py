"""What AutoAttack's versions cost and find on one fine-tuned model.

    python benchmarks/autoattack_cost.py --model RUN_DIR [--n 256] [--device cpu|cuda] [--out FILE.json]

Runs PGD-10, ``autoattack(version="apgd")`` and ``autoattack(version="standard")`` at the run's
white-box ε on the first ``--n`` test images of the run's dataset, and prints robust accuracy,
wall time and, per AutoAttack member, how many points it ran on and fooled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from genaf.api import data_from_config
from genaf.attacks.autoattack import autoattack
from genaf.attacks.whitebox import pgd
from genaf.config import DEFAULTS
from genaf.models import load_model
from genaf.utils import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = Path(a.model)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    wb = {**DEFAULTS["eval"]["whitebox"], **(cfg["eval"].get("whitebox") or {})}
    eps = float(wb["eps"])
    dev = resolve_device(a.device)
    model = load_model(run, dev).eval()
    test = data_from_config(cfg).test.subset(a.n)
    x, y = test.float_images().to(dev), test.labels.to(dev)

    def acc(xa) -> float:
        with torch.no_grad():
            return float((model(xa).argmax(1) == y).float().mean())

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    res = {"model": str(run), "n": len(y), "eps": eps, "device": str(dev), "clean_acc": acc(x), "runs": {}}
    gen = torch.Generator().manual_seed(0)
    xa, sec = timed(lambda: pgd(model, x, y, eps, wb["step"], 10, random_start=True, gen=gen))
    res["runs"]["pgd10"] = {"robust_acc": acc(xa), "seconds": round(sec, 2)}
    for version in ("apgd", "standard"):
        log: dict = {}
        xa, sec = timed(lambda v=version, lg=log: autoattack(model, x, y, eps, version=v, log=lg))
        res["runs"][f"autoattack-{version}"] = {"robust_acc": acc(xa), "seconds": round(sec, 2), "per_attack": log}
    for k, r in res["runs"].items():
        print(f"{k}: robust accuracy {100 * r['robust_acc']:.1f} % in {r['seconds']:.1f} s {r.get('per_attack', '')}")
    print(f"clean accuracy {100 * res['clean_acc']:.1f} % on {len(y)} images ({dev})")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
