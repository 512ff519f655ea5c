"""What the BatchNorm fold and the shared loss-check run save in an evaluation, side by side.

    python benchmarks/eval_fold.py [--n-test 2000] [--reps 2] [--threads N] --out FILE.json

The demo's evaluation of one fine-tuned model: the shipped demo encoder (ResNet-18, width 16)
with a downstream head, white-box PGD-10 (ε 8/255, step 2/255) and FGSM on ``--n-test``
Fashion-MNIST demo test images, and the self-checks on the first 256. Timed, interleaved in
each repetition (the median is reported):

- ``evaluate_fold``: ``genaf.evaluation.evaluate_model`` as it runs now: the attacks on the
  BatchNorm-folded copy, the self-checks' loss run shared with their curve at the base ε;
- ``evaluate_module``: the same with ``fold_bn=False`` (the attacks on the model itself);
- ``checks_before``: what the self-checks cost before the shared run: today's run_checks on the
  model itself plus one more PGD run at the base ε (the loss check's own run, now shared).

Also the white-box robust accuracies of the two evaluations (they agree up to rounding-level
flips; tests/test_fold_bn.py checks the same on a small case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def fit_head(model, data, steps: int = 300) -> None:
    """A linear-probe-like head on the frozen encoder's features (so the accuracies mean
    something; the timing does not depend on it)."""
    with torch.no_grad():
        feats = model.encoder(data.train.float_images())
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    y = data.train.labels
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(feats), y).backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from genaf.checks import _wb_pgd, run_checks
    from genaf.data import load_dataset
    from genaf.encoders import load_encoder
    from genaf.evaluation import evaluate_model
    from genaf.models import DownstreamModel

    data = load_dataset("fashion-mnist-demo", n_train=3000, n_val=1000, n_test=args.n_test, seed=0)
    torch.manual_seed(0)
    model = DownstreamModel(load_encoder("demo"), data.num_classes).eval()
    fit_head(model, data)
    wb = {"eps": 8 / 255, "step": 2 / 255, "steps": 10, "restarts": 1, "fgsm": True}
    sub = data.test.subset(256)
    xs, ys = sub.float_images(), sub.labels
    times: dict[str, list[float]] = {"evaluate_fold": [], "evaluate_module": [], "checks_before": [], "checks_now": []}
    results = {}
    for _ in range(args.reps):
        for fold in (True, False):
            t0 = time.perf_counter()
            res = evaluate_model(model, data.test, whitebox=wb, batch_size=512, fold_bn=fold)
            times["evaluate_fold" if fold else "evaluate_module"].append(time.perf_counter() - t0)
            results[fold] = res["metrics"]["robust_acc"]
        t0 = time.perf_counter()
        run_checks(model, xs, ys, {}, wb, data.num_classes)
        t1 = time.perf_counter()
        _wb_pgd(model, xs, ys, wb, wb["eps"], 0, [])
        t2 = time.perf_counter()
        times["checks_now"].append(t1 - t0)
        times["checks_before"].append(t2 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "threads": torch.get_num_threads(),
        "n_test": args.n_test,
        "reps": args.reps,
        "seconds_median": {k: round(v, 2) for k, v in med.items()},
        "seconds_all": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "evaluate_speedup_fold": round(med["evaluate_module"] / med["evaluate_fold"], 3),
        "checks_speedup_shared_run": round(med["checks_before"] / med["checks_now"], 3),
        "clean_acc": res["metrics"]["clean_acc"],
        "robust_acc_fold": results[True],
        "robust_acc_module": results[False],
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
