"""One training epoch in one process against the same epoch data-parallel in N processes
(torchrun, gloo on the CPU, one thread each), with BatchNorm on the global batch's statistics
(``--ddp-batchnorm global``, the default) and on each process's own (``rank``), and the share of
the epoch spent in collectives.

    python benchmarks/ddp_epoch.py --out ddp-epoch.json [--procs 2] [--work DIR]

Both runs are ``genaf finetune`` of ``genaf-stage1`` on the demo encoder and Fashion-MNIST with
the same global batch (the defaults below), one epoch of stage 1 and no head warm-up, started
from the command line as a user would. The epoch time is the history row's ``seconds`` (the
training steps and the epoch's validation). The collectives are timed by genaf itself
(``metrics.json`` ``distributed.communication``): ``grad`` from the hand-over of a gradient
bucket to DDP's all-reduce until it completes, ``batchnorm`` the all-reduces of the global
BatchNorm statistics (forward and backward), ``other`` the rest of the run (validation counts,
stage-end broadcasts, the final evaluation's gathers). Each interval includes the time spent
waiting for the slower process, so on a loaded machine it also measures imbalance. The share is
(grad + batchnorm) seconds of rank 0 over its epoch seconds (those two occur only in training
steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = [
    "finetune",
    "--encoder",
    "demo",
    "--dataset",
    "fashion-mnist",
    "--method",
    "genaf-stage1",
    "--device",
    "cpu",
    "--epochs",
    "1",
    "--set",
    "warmup_epochs=0",
    "--quiet",
]


def run(procs: int, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if procs == 1:
        cmd = [sys.executable, "-m", "genaf", *ARGS, *extra, "--out", str(out)]
    else:
        torchrun = shutil.which("torchrun") or "torchrun"
        cmd = [torchrun, f"--nproc_per_node={procs}", "-m", "genaf", *ARGS, *extra, "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    row = next(r for r in history if r["stage"] == "stage1")
    res = {
        "processes": procs,
        "command": " ".join(cmd),
        "epoch_seconds": row["seconds"],
        "command_wall_seconds": round(wall, 1),
        "loss": row["loss"],
        "val_clean": row.get("val_clean"),
        "clean_acc": metrics["clean_acc"],
    }
    d = metrics.get("distributed")
    if d:
        comm = d["communication"]
        res["communication"] = comm
        inside = comm["grad"]["seconds"] + comm["batchnorm"]["seconds"]
        res["epoch_communication_share"] = round(inside / row["seconds"], 3)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (required)")
    ap.add_argument("--procs", type=int, default=2, help="processes of the data-parallel run (default 2)")
    ap.add_argument("--n-train", type=int, default=512, help="training images (default 512)")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    ap.add_argument("--attack-steps", type=int, default=3, help="training PGD steps (default 3)")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    a = ap.parse_args()
    extra = [
        "--n-train",
        str(a.n_train),
        "--n-val",
        "128",
        "--n-test",
        "128",
        "--batch-size",
        str(a.batch_size),
        "--attack-steps",
        str(a.attack_steps),
    ]
    work = Path(a.work or tempfile.mkdtemp(prefix="genaf-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    one = run(1, work / "one", extra)
    many = run(a.procs, work / f"procs{a.procs}", extra)
    local = run(a.procs, work / f"procs{a.procs}-rank-bn", extra + ["--ddp-batchnorm", "rank"])
    out = {
        "date_utc": started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "setting": {"n_train": a.n_train, "batch_size": a.batch_size, "attack_steps": a.attack_steps},
        "one_process": one,
        "data_parallel": many,
        "data_parallel_rank_batchnorm": local,
        "epoch_speedup": round(one["epoch_seconds"] / many["epoch_seconds"], 3),
        "epoch_speedup_rank_batchnorm": round(one["epoch_seconds"] / local["epoch_seconds"], 3),
    }
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"1 process: epoch {one['epoch_seconds']} s; {a.procs} processes: epoch {many['epoch_seconds']} s "
        f"(speed-up {out['epoch_speedup']}); collectives {many.get('epoch_communication_share')} of the epoch; "
        f"with per-process BatchNorm: epoch {local['epoch_seconds']} s "
        f"(speed-up {out['epoch_speedup_rank_batchnorm']}), "
        f"collectives {local.get('epoch_communication_share')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
