"""``genaf bench CONFIG --out DIR --ray [ADDRESS]``: the experiment matrix as Ray tasks.

Ray does the scheduling; genaf only says what each task needs and what it waits for:

* a wave of *crafting tasks*, one per input that several units share and that is not on disk
  yet: a universal perturbation (encoder, attack, surrogate, ε, seed) into
  ``OUT/perturbations/``, or the per-sample DAE images of (encoder, dataset, attack, ε, seed)
  into ``OUT/per-sample/``;
* one *unit task* per unit (encoder, dataset, method, seed) with cells left to do. It gets the
  ObjectRefs of the crafting tasks whose files it reads as arguments, so Ray starts it only once
  they have finished. It fine-tunes (or resumes, or reuses) the model and computes its cells,
  exactly as ``--shard I/N`` with N = the number of units and I = the unit's position: its rows
  go to ``OUT/shards/I-of-N.json`` one evaluation at a time.

Every task asks for ``cpus_per_task`` CPUs (1 by default) and, when the bench runs on CUDA, one
GPU. The driver holds ``OUT`` to itself (the lock of an unsharded run) for the whole run, logs each
task's lines when it finishes, and at the end merges the shard files into ``results.json`` /
``results.csv`` and writes the report: the files of an unsharded run, apart from the
``*_seconds`` columns. The caches are those of every bench (``genaf.bench``): killed at any moment,
the same command continues where it stopped (finished rows, perturbations and fine-tunes are
reused; an interrupted fine-tune resumes from its epoch checkpoint), and an unsharded run or a
``--shard`` run may finish what a Ray run began, or the other way round.

Without an address the driver starts a local Ray instance (``num_cpus`` CPUs, by default this
machine's; no dashboard; a 100 MB object store, since tasks pass only file names) whose workers
import genaf from the driver's own code (their ``PYTHONPATH`` starts with it) and start in the
driver's working directory, and shuts it down at the end. With an address (``auto``,
``HOST:PORT`` or ``ray://HOST:PORT``) it connects to that cluster: every node needs the same genaf
installed and sees ``OUT`` (and the datasets and encoder files) at the same path, on a shared
filesystem.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError, GenafError

OBJECT_STORE_BYTES = 100 * 2**20  # tasks return log lines and counts; the files are on the shared disk
INSTALL_HINT = "pip install 'genaf[ray]'"


def import_ray():
    """The ``ray`` module, or a one-line :class:`~genaf.errors.ConfigError` naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"--ray needs the ray package, which is not installed: {INSTALL_HINT}") from exc
    return ray


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------ in the workers
def _setup(job: dict, shard: tuple[int, int] | None = None):
    """A :class:`~genaf.bench.Bench` in a Ray worker, with the driver's configuration, device,
    encoder lock, limits and working directory; its log lines are collected and returned."""
    import torch

    import genaf

    from . import limits
    from .bench import Bench, load_config

    if genaf.__version__ != job["version"]:
        raise ConfigError(
            f"the Ray worker on {socket.gethostname()} imports genaf {genaf.__version__} from "
            f"{Path(genaf.__file__).parent}, the driver genaf {job['version']}: install the same genaf on every node"
        )
    out = Path(job["out"])
    if not (out / "bench.yaml").is_file():
        raise ConfigError(
            f"the Ray worker on {socket.gethostname()} does not see {out}/bench.yaml: the output folder must be "
            "on a filesystem every node sees at the same path"
        )
    if os.path.isdir(job["cwd"]):  # relative paths of the configuration mean what they mean to the driver
        os.chdir(job["cwd"])
    limits.reset()
    for name, value in job["limits"].items():
        limits.set_limit(name, value)
    torch.set_num_threads(job["threads"])
    cfg = load_config(job["raw"])
    cfg.device = job["device"]
    lines: list[str] = []

    def log(*parts, **_kw) -> None:
        lines.append(" ".join(str(p) for p in parts))

    bench = Bench(cfg, out, log, shard=shard, locked=job["locked"])
    bench.shared = True  # other tasks write into OUT beside this one
    return bench, lines


def _result(lines: list[str], computed: int = 0) -> dict:
    import genaf

    return {"lines": lines, "computed": computed, "genaf": str(Path(genaf.__file__).resolve().parent)}


def craft_task(job: dict, kind: str, enc: str, dataset: str | None, attack: str, eps: float, seed: int) -> dict:
    """Make one shared input of the units (module docstring): a universal perturbation
    (``kind="universal"``) or the per-sample DAE images of a dataset (``kind="per-sample"``)."""
    bench, lines = _setup(job)
    a = next(x for x in bench.cfg.attacks if x.label == attack)
    if kind == "universal":
        path = bench.pert_path(enc, a, eps, seed)
        bench.perturbation(None if path.is_file() else bench.encoder(enc), path, a, eps, seed)
    else:
        ds = next(d for d in bench.cfg.datasets if d.label == dataset)
        bench.per_sample_images(enc, ds, a, eps, seed, bench.data(ds, seed))
    return _result(lines)


def unit_task(job: dict, index: int, n_units: int, *_inputs) -> dict:
    """Compute the cells of unit ``index`` (of ``n_units``) left to do, as shard ``index/n_units``;
    ``_inputs``: the results of the crafting tasks it waits for."""
    bench, lines = _setup(job, shard=(index, n_units))
    bench.where = f" (unit {index + 1}/{n_units} on Ray)"
    (seed, enc, ds, m) = bench.units(bench.shard)[0]
    wanted = {k: c["fingerprint"] for k, c in bench.unit_cells(enc, ds, m, seed).items()}
    bench.load_rows(wanted)
    bench.run()
    bench.save()
    return _result(lines, bench.computed)


# ------------------------------------------------------------------------------ the driver
def _plan(bench) -> tuple[list[tuple], dict[tuple, str]]:
    """The units with cells left to do, ``[(index, label, cells to do, craft keys it waits for)]``,
    and the shared inputs not on disk yet, ``{craft key: label}``."""
    plan, crafts = [], {}
    units = bench.units()
    for i, (seed, enc, ds, m) in enumerate(units):
        cells = bench.unit_cells(enc, ds, m, seed)
        pending = [c for k, c in cells.items() if k not in bench.rows]
        if not pending:
            continue
        deps = []
        for c in pending:
            if c["setting"] not in ("dae", "fresh-head"):
                continue
            a, eps = c["spec"], c["eps"]
            if a.per_sample:
                stem = bench.per_sample_stem(enc, ds, a, eps, seed)
                done = all(stem.with_name(f"{stem.name}-{s}.safetensors").is_file() for s in ("test", "val"))
                key = ("per-sample", enc, ds.label, a.label, eps, seed)
                what = f"per-sample {a.label} images of {ds.label}"
            else:
                done = bench.pert_path(enc, a, eps, seed).is_file()
                key = ("universal", enc, None, a.label, eps, seed)
                what = f"universal {a.label} perturbation"
            if done:
                continue
            crafts.setdefault(key, f"{enc}: {what} (ε={eps:.4f}, seed {seed})")
            if key not in deps:
                deps.append(key)
        label = f"{enc} / {ds.label} / {m.label} / seed {seed}"
        plan.append((i, label, len(pending), deps))
    return plan, crafts


def _init_ray(ray, address: str | None, num_cpus: int | None) -> bool:
    """Start a local instance or connect to ``address``; returns whether this call started Ray
    (and so shuts it down at the end)."""
    if ray.is_initialized():  # a caller of run_bench that started Ray itself: use that instance
        return False
    if address in (None, "local"):
        import genaf

        src = str(Path(genaf.__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",
            num_cpus=num_cpus or _local_cpus(),
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return True


def _task_resources(ray, device: str, cpus_per_task: int, local: bool, log) -> tuple[dict, str]:
    """Ray resources of one task and the device it computes on."""
    have = ray.cluster_resources()
    gpus, cpus = have.get("GPU", 0), have.get("CPU", 0)
    where = "this Ray instance" if local else "the Ray cluster"
    gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if gpu and gpus < 1:
        msg = f"the bench's device is {device} but {where} has no GPU"
        if local:
            raise ConfigError(f"{msg}; use --device cpu")
        log(f"bench: warning: {msg} now; the tasks wait until one joins")
    if cpus < cpus_per_task:
        msg = f"each task asks for {cpus_per_task} CPU(s) but {where} has {cpus:g}"
        if local:
            raise ConfigError(f"{msg}; lower --ray-cpus-per-task or raise --ray-cpus")
        log(f"bench: warning: {msg} now; the tasks wait until enough join")
    task_device = "cuda" if gpu else ("cpu" if device == "auto" else device)
    return {"num_cpus": cpus_per_task, "num_gpus": 1 if gpu else 0}, task_device


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised (a genaf error keeps its one-line message)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, GenafError) else exc


def run_bench_ray(
    config_path_or_dict,
    cfg,
    out: Path,
    log,
    t0: float,
    update_lock: bool,
    address: str | None,
    cpus_per_task: int | None = None,
    num_cpus: int | None = None,
) -> dict:
    """What :func:`genaf.bench.run_bench` does with ``ray=``: the same files, its units run as Ray
    tasks (module docstring)."""
    from .bench import Bench, _lock, _merge_locked, _prepare_unsharded, read_results

    ray = import_ray()
    local = address in (None, "local")
    cpus_per_task = 1 if cpus_per_task is None else cpus_per_task
    if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
        raise ConfigError(f"--ray-cpus-per-task must be a whole number >= 1, got {cpus_per_task!r}")
    if num_cpus is not None:
        if not local:
            raise ConfigError(
                f"--ray-cpus sizes a local Ray instance; the cluster at {address} has its own CPUs: drop --ray-cpus"
            )
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1:
            raise ConfigError(f"--ray-cpus must be a whole number >= 1, got {num_cpus!r}")
    out = out.resolve()
    # the driver plans and merges; it computes nothing, so it needs no GPU
    plan_cfg = dataclasses.replace(cfg, device="cpu")
    computed = 0
    with _lock(out):
        locked = _prepare_unsharded(config_path_or_dict, plan_cfg, out, update_lock, log)
        bench = Bench(plan_cfg, out, log, locked=locked)
        wanted = bench.all_cells()
        bench.load_rows(wanted)
        plan, crafts = _plan(bench)
        todo = sum(n for _, _, n, _ in plan)
        log(
            f"bench: {len(wanted)} cell(s), {todo} to do, output in {out}; on Ray: {len(crafts)} crafting task(s), "
            f"then {len(plan)} unit task(s)"
        )
        if plan:
            started = _init_ray(ray, address, num_cpus)
            try:
                n_units = len(bench.units())
                computed = _run_tasks(ray, cfg, out, locked, plan, crafts, n_units, cpus_per_task, local, started, log)
            finally:
                if started:
                    ray.shutdown()
        if not _merge_locked(out, plan_cfg, log):
            raise GenafError(f"bench: every Ray task finished but {out} still lacks cells; run the command again")
        from .bench_report import build_report

        report = build_report(out)
    log(f"bench: done in {time.time() - t0:.0f} s ({computed} cell(s) computed on Ray); report: {report}")
    return {
        "rows": read_results(out)["rows"],
        "computed": computed,
        "results": str(out / "results.json"),
        "report": str(report),
    }


def _run_tasks(
    ray, cfg, out: Path, locked: dict, plan, crafts, n_units: int, cpus_per_task: int, local: bool, started: bool, log
) -> int:
    """Submit the crafting tasks, then the unit tasks that wait for them; log each task's lines
    as it finishes; returns the number of cells computed."""
    import genaf

    from . import limits
    from .utils import Progress

    resources, device = _task_resources(ray, cfg.device, cpus_per_task, local, log)
    log(
        f"bench: Ray tasks of {resources['num_cpus']} CPU(s)"
        + (" and 1 GPU" if resources["num_gpus"] else "")
        + f" on {device}; Ray has {ray.cluster_resources().get('CPU', 0):g} CPU(s), "
        f"{ray.cluster_resources().get('GPU', 0):g} GPU(s)"
    )
    job = ray.put(
        {
            "raw": cfg.raw,
            "device": device,
            "out": str(out),
            "cwd": os.getcwd(),
            "locked": locked,
            "limits": dict(limits._overrides),
            "threads": cpus_per_task,
            "version": genaf.__version__,
        }
    )
    craft_fn = ray.remote(craft_task).options(**resources, name="genaf-craft")
    unit_fn = ray.remote(unit_task).options(**resources, name="genaf-unit")
    waiting: dict = {}
    craft_refs = {}
    for key, label in crafts.items():
        kind, enc, ds, attack, eps, seed = key
        ref = craft_fn.remote(job, kind, enc, ds, attack, eps, seed)
        craft_refs[key] = ref
        waiting[ref] = ("craft", label, 0)
    for index, label, n_cells, deps in plan:
        ref = unit_fn.remote(job, index, n_units, *[craft_refs[k] for k in deps])
        waiting[ref] = ("unit", label, n_cells)
    here = str(Path(genaf.__file__).resolve().parent)
    computed = 0
    try:
        with Progress(sum(n for _, _, n, _ in plan), "bench", unit="cells", log=log) as bar:
            while waiting:
                done, _ = ray.wait(list(waiting), num_returns=1)
                for ref in done:
                    kind, label, _n = waiting.pop(ref)
                    try:
                        res = ray.get(ref)
                    except Exception as exc:
                        raise _cause(exc) from None
                    if local and started and res["genaf"] != here:
                        raise ConfigError(
                            f"the local Ray workers imported genaf from {res['genaf']}, the driver from {here}; "
                            "unset a PYTHONPATH that points elsewhere"
                        )
                    for line in res["lines"]:
                        log(line)
                    if kind == "unit":
                        computed += res["computed"]
                        bar.update(res["computed"], f"{label} done")
    except BaseException:
        for ref in waiting:  # the work already done stays on disk: the same command resumes it
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - a task that ended meanwhile
                pass
        raise
    return computed
