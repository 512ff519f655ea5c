"""The Python API the README teaches. Raises typed errors (``genaf.errors``); never exits.

enc = genaf.load_encoder("demo")
data = genaf.load_dataset("fashion-mnist", n_train=3000, n_val=1000, n_test=2000)
run = genaf.finetune("demo", "fashion-mnist", method="genaf", out="runs/genaf")
pert = genaf.craft("demo", "l4a-base", data.surrogate(2000), eps=16/255)
metrics = genaf.evaluate("runs/genaf", perturbations={"l4a": pert})
genaf.export("runs/genaf", "torchvision", "encoder.safetensors")   # loads with torchvision:resnet18:PATH
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .attacks import Perturbation, create_attack
from .attacks.universal import encoder_hash
from .config import resolve
from .data import DataModule, ImageSet, load_dataset
from .data.module import small_split_warning
from .distributed import BACKENDS, SOLO, check_global_batch, check_train_split, init_team, launched
from .encoders import Encoder, load_encoder
from .encoders.base import check_image_size, warn_native_size
from .errors import CheckpointError, ConfigError, DataError, first_line
from .evaluation import evaluate_model
from .exports import export
from .methods.base import create_method
from .models import DownstreamModel, load_model, save_model
from .train import LAST_EPOCH, TrainConfig, Trainer
from .utils import (
    atomic_write,
    check_eps,
    deterministic_mode,
    resolve_device,
    seed_everything,
    unit_seed,
    versions,
    write_json,
)

__all__ = [
    "load_encoder",
    "load_dataset",
    "load_model",
    "finetune",
    "craft",
    "evaluate",
    "export",
    "data_from_config",
]


def data_from_config(cfg: dict) -> DataModule:
    d = cfg["data"]
    return load_dataset(
        cfg["dataset"],
        root=d.get("root"),
        image_size=d.get("image_size"),
        n_train=d.get("n_train"),
        n_val=d.get("n_val"),
        n_test=d.get("n_test"),
        seed=cfg["seed"],
        download=d.get("download", False),
        surrogate_reserve=d.get("surrogate_reserve"),
    )


def _check_layer_counts(mcfg: dict, model: DownstreamModel) -> None:
    """Fail before training when a stage would later ask for more layers than the model has."""
    from .methods.sensitivity import weight_units

    n = len(weight_units(model))
    for key in ("stage2_k", "rift_k"):
        k = int(mcfg.get(key) or 0)
        if k > n:
            raise ConfigError(f"{key}={k} but the model has only {n} Conv2d/Linear layers; choose {key} <= {n}")
    if mcfg.get("stage2_layers"):
        from .methods.genaf import check_stage2_layers

        check_stage2_layers(mcfg["stage2_layers"], model)


def _warn(log, msg: str) -> None:
    """A warning goes to the log and, when the log is silenced, to stderr."""
    import sys

    if log in (None, print):
        print(f"genaf: {msg}", file=sys.stderr)
    else:
        log(msg)
        print(f"genaf: {msg}", file=sys.stderr)


def _silent(*_args, **_kwargs) -> None:
    """A log that drops every line (``log=None``)."""


def weight_drift(model: DownstreamModel, start: dict[str, torch.Tensor]) -> float:
    """Relative encoder weight drift ``‖θ − θ0‖ / ‖θ0‖`` over floating-point parameters."""
    num = den = 0.0
    for k, p in model.encoder.named_parameters():
        p0 = start[k].to(p.device)
        num += float((p.detach() - p0).pow(2).sum())
        den += float(p0.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def finetune(
    encoder: str = "demo",
    dataset: str = "fashion-mnist",
    method: str = "genaf",
    out: str | Path = "runs/run",
    config: dict | None = None,
    method_config: dict | None = None,
    train: dict | None = None,
    data: dict | None = None,
    seed: int | None = None,
    resume: bool = False,
    datamodule: DataModule | None = None,
    log=print,
    continue_from: str | Path | None = None,
) -> dict:
    """Fine-tune ``encoder`` on ``dataset`` with ``method``; write a run directory at ``out``.

    The run directory holds ``model.safetensors`` + ``model.json`` (``load_model``),
    ``config.yaml`` (the resolved configuration), ``metrics.json`` (clean and white-box
    robust accuracy on the test split, the training budget, the data read), ``predictions.json``,
    ``history.json`` and, for ``genaf``, ``sensitivity.json``. ``checkpoint.pt`` (the full
    training state, written atomically after every epoch) is removed once the run has finished,
    unless ``train={"keep_checkpoint": True}``. Returns the metrics dict.

    ``log`` receives each progress line (default ``print``); ``log=None`` runs silently
    (warnings still go to stderr).

    ``continue_from``: a finished run folder made with ``train={"keep_last_epoch": True}`` and the
    same options except more epochs (``method_config["epochs"]``) in the method's last stage. The
    new run starts from that run's last epoch instead of from scratch and computes the same
    result as a run of all its epochs from scratch (the seeds of every epoch depend only on the
    seed, the stage and the epoch; the best-epoch record and the pass counts carry over), at the
    cost of the added epochs only. ``metrics.json`` records it under ``continued_from``.
    """
    if log is None:
        log = _silent
    cfg = resolve(
        config,
        encoder=encoder,
        dataset=dataset,
        method=method,
        seed=seed,
        method_config=method_config or None,
        train=train or None,
        data=data or None,
    )
    out = Path(out)
    check_seed(cfg["seed"])
    if not launched():  # under torchrun: on rank 0, once the process group runs (below)
        check_run_dir(out, resume)
    meth = create_method(cfg["method"], **cfg["method_config"])
    cfg["method_config"] = dict(meth.cfg)
    from .config import typed_fields

    tcfg = TrainConfig(**{"seed": cfg["seed"], **typed_fields(TrainConfig, cfg["train"], "train")})
    tcfg.validate()
    cfg["train"] = {k: getattr(tcfg, k) for k in tcfg.__dataclass_fields__}
    continued = False
    if continue_from is not None:
        if resume:
            raise ConfigError("continue_from starts a new run from another run's last epoch; it cannot resume one")
        if launched():
            raise ConfigError("continue_from is not supported under torchrun yet; run it on one process")
        cfg["continued_from"] = check_continuation(Path(continue_from), cfg, meth)
        resume = continued = True  # from the checkpoint copied into out once the data are checked
    team = SOLO
    if launched():  # torchrun: one of several processes (genaf.distributed, docs/DISTRIBUTED.md)
        team, _ = init_team(resolve_device(tcfg.device), tcfg.dist_backend)
    try:
        return _finetune_team(cfg, meth, tcfg, out, resume, datamodule, log, team, continued)
    finally:
        team.close()


def _finetune_team(cfg, meth, tcfg, out: Path, resume: bool, datamodule, log, team, continued: bool = False) -> dict:
    """``finetune`` once the configuration is resolved: on one process, or on each of a torchrun
    run's (files are checked and written by rank 0 only; every process trains its share)."""
    if team.distributed:
        team.on_main(check_run_dir, out, resume)
        check_global_batch(tcfg.batch_size, team)
        if not team.is_main:
            log = _silent
    saved = team.on_main(_saved_config, out) if resume and not continued else None
    if team.distributed and resume:
        saved = team.broadcast_json(saved)
    if saved is not None:
        check_same_run(saved, cfg, out)
        if "continued_from" in saved:  # a continued run, resumed: it still started from that run
            cfg["continued_from"] = saved["continued_from"]
    device = team.device if team.distributed else resolve_device(tcfg.device)
    seed_everything(cfg["seed"])
    enc = load_encoder(cfg["encoder"])
    dm = datamodule if datamodule is not None else data_from_config(cfg)
    # before the run folder is written: timm/hf patch sizes from the metadata, genaf's ViT by its module
    check_image_size(enc.meta, dm.image_size)
    enc.check_input_size(*dm.train.images.shape[-2:])
    warn_native_size(enc.meta, tuple(dm.train.images.shape[-2:]))
    cfg["data_info"] = dm.info
    cfg["encoder_files"] = list(getattr(enc, "source_files", []))
    if saved is not None:
        check_same_data(saved, cfg, out)
        check_same_encoder_files(saved, cfg, out)
    if continued:  # the run it starts from read these data and encoder files
        source = Path(cfg["continued_from"]["run"])
        check_same_data(_saved_config(source) or {}, cfg, source, "continue_from")
        check_same_encoder_files(_saved_config(source) or {}, cfg, source, "continue_from")
        atomic_write(out / "checkpoint.pt", lambda tmp: shutil.copyfile(source / LAST_EPOCH, tmp))
    if team.distributed:
        check_train_split(len(dm.train), tcfg.batch_size, team)

    def lock_run():
        out.mkdir(parents=True, exist_ok=True)
        return run_lock(out)

    lock = team.on_main(lock_run)
    try:
        return _finetune_locked(cfg, meth, tcfg, device, enc, dm, out, resume, log, team)
    finally:
        if lock is not None:
            lock.close()


def _silent(*_a, **_k) -> None:
    pass


# Options that may differ on --resume: where the run executes and how it reports, not what it computes.
RESUME_FREE = {
    ("train", "device"),
    ("train", "progress"),
    ("train", "logger"),
    ("train", "dist_backend"),
    ("data", "root"),
    ("data", "download"),
}


def check_seed(seed) -> int:
    """A seed is a whole number in [0, 2^63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be a whole number in [0, 2^63), got {seed!r}")
    return seed


def check_run_dir(out: Path, resume: bool) -> None:
    """``--out`` must be a new or empty folder (or a genaf run to ``--resume``), writable now."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; choose a folder for the run")
    has_run = out.is_dir() and any((out / f).exists() for f in ("config.yaml", "checkpoint.pt", "model.safetensors"))
    if resume:
        if not (out / "checkpoint.pt").is_file():
            done = (out / "metrics.json").is_file()
            raise CheckpointError(
                f"--resume: {out} "
                + (
                    "holds a finished run; there is nothing to resume"
                    if done
                    else "has no checkpoint.pt to resume from"
                )
            )
    elif has_run:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    elif out.is_dir() and any(p.name != ".genaf.lock" for p in out.iterdir()):
        raise ConfigError(f"--out {out} is a folder with other files in it; choose a new or empty folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"--out {out} cannot be created ({exc.strerror}); choose a writable place") from exc
    if not _writable(out / "config.yaml"):
        raise CheckpointError(f"--out {out} is not writable; choose a writable place (nothing was trained)")


def check_continuation(source: Path, cfg: dict, meth) -> dict:
    """``continue_from``: ``source`` is a finished run that kept its last epoch, made with ``cfg``'s
    options but fewer (or as many) epochs in the method's last stage, and no other difference.
    Returns what ``config.yaml`` and ``metrics.json`` record of it."""
    where = f"continue_from {source}"
    if not (source / LAST_EPOCH).is_file():
        raise ConfigError(
            f"{where}: no {LAST_EPOCH} there; the run to continue must be made with train "
            "keep_last_epoch: true (and finished)"
        )
    if not (source / "metrics.json").is_file():
        raise ConfigError(f"{where}: that run has not finished (no metrics.json); finish it first")
    saved = _saved_config(source) or {}
    ignore = {("train", "keep_last_epoch"), ("method_config", "epochs")}
    diff = [d for d in _differences(saved, cfg) if not any(d.startswith(".".join(k) + ":") for k in ignore)]
    if diff:
        raise ConfigError(
            f"{where}: the options differ from that run ({'; '.join(diff[:6])}); only the epochs of "
            "the last stage may grow"
        )
    before = [st.epochs for st in create_method(saved["method"], **saved["method_config"]).stages()]
    now = [st.epochs for st in meth.stages()]
    if len(before) != len(now) or before[:-1] != now[:-1] or now[-1] < before[-1]:
        raise ConfigError(
            f"{where}: that run's stages ran {before} epochs and this one asks for {now}; only the last "
            "stage's epochs may grow (e.g. sft or at trained longer)"
        )
    metrics = json.loads((source / "metrics.json").read_text())
    return {"run": str(source), "epochs": before[-1], "train_seconds": metrics.get("train_seconds")}


def _saved_config(out: Path) -> dict | None:
    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        from .config import safe_yaml

        saved = safe_yaml(path.read_bytes(), str(path))
    except ConfigError as exc:
        raise CheckpointError(f"--resume: {path} is not valid YAML ({first_line(exc)})") from exc
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: {path} is empty or not a genaf run configuration")
    return saved


def _differences(a, b, path=()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if path + (k,) in RESUME_FREE or (not path and k in ("data_info", "encoder_files", "continued_from")):
                continue
            out += _differences(a.get(k), b.get(k), path + (k,))
        return out
    if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-12 * max(abs(a), abs(b))):
        return [f"{'.'.join(map(str, path))}: saved {a!r}, now {b!r}"]
    return []


def check_same_run(saved: dict, cfg: dict, out: Path) -> None:
    """``--resume`` continues the saved run, not another one: every option that shapes the result
    must be the saved one (only device, progress and where the data live may change)."""
    diff = _differences(saved, cfg)
    if diff:
        raise ConfigError(
            f"--resume: the options differ from the run saved in {out} ({'; '.join(diff[:6])}"
            + (f"; +{len(diff) - 6} more" if len(diff) > 6 else "")
            + "); resume with the saved options, or start a new run in another --out"
        )


def check_same_data(saved: dict, cfg: dict, out: Path, what: str = "--resume") -> None:
    old, new = saved.get("data_info") or {}, cfg["data_info"]
    for k in ("train_indices_sha256", "val_indices_sha256", "test_indices_sha256", "n_train", "n_val", "n_test"):
        if k in old and old[k] != new.get(k):
            raise ConfigError(
                f"{what}: the data differ from the run saved in {out} ({k}: saved {old[k]}, now {new.get(k)}); "
                "point --data-root at the files the run started with"
            )


def check_same_encoder_files(saved: dict, cfg: dict, out: Path, what: str = "--resume") -> None:
    """``--resume`` reads the encoder files the run started from: same sha256 (the lock in config.yaml)."""
    old = {f.get("path"): f.get("sha256") for f in saved.get("encoder_files") or [] if f.get("sha256")}
    for f in cfg.get("encoder_files") or []:
        if f.get("path") in old and f.get("sha256") != old[f.get("path")]:
            raise CheckpointError(
                f"{what}: encoder file {f['path']} changed since the run started (sha256 {old[f['path']]} in "
                f"{out / 'config.yaml'}, now {f['sha256']}); restore the file or start a new run in another --out"
            )


# What makes two entries of one name the same perturbation (re-evaluating it updates the entry).
_SAME_ENTRY = ("type", "attack", "eps", "kind", "surrogate", "encoder_hash", "seed", "preset")


def check_no_name_collision(old: dict, new: dict, where: Path) -> None:
    """Refuse to replace a recorded entry with a *different* perturbation of the same name (e.g.
    ``a/ssp.safetensors`` then ``b/ssp.safetensors`` evaluated in two calls): the first result would
    silently vanish. The same perturbation evaluated again updates its entry."""
    for name, desc in new.items():
        before = old.get(name)
        if not before:
            continue
        diff = [k for k in _SAME_ENTRY if k in before and k in desc and before[k] != desc[k]]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{where} already holds an entry '{name}' measured with another perturbation ({k} {before[k]!r}, "
                f"now {desc[k]!r}); rename the file (the entry takes its name) or evaluate into another --out FILE"
            )


def run_lock(out: Path):
    """An exclusive lock on a run folder for the duration of a fine-tune: a second genaf on the
    same --out is refused at once instead of both writing into it."""
    fh = open(out / ".genaf.lock", "w")
    try:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        pass
    except OSError as exc:
        fh.close()
        raise ConfigError(
            f"another genaf is writing into {out} right now; wait for it or choose another --out"
        ) from exc
    return fh


def _finetune_locked(cfg, meth, tcfg, device, enc, dm, out: Path, resume: bool, log, team=SOLO) -> dict:
    main = team.is_main  # under torchrun only rank 0 writes files
    if main:
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=False)))
    torch.manual_seed(unit_seed(cfg["seed"], "head-init"))
    model = DownstreamModel(enc, dm.num_classes, cfg["head"])
    _check_layer_counts(meth.cfg, model)
    start = {k: v.detach().clone() for k, v in model.encoder.named_parameters()}
    start_hash = encoder_hash(enc)
    warn = small_split_warning(f"validation split of {dm.name}", len(dm.val))
    if warn and main:
        _warn(log, warn)
    t0 = time.time()
    with deterministic_mode(tcfg.deterministic) as determinism:
        trainer = Trainer(model, dm, meth, tcfg, out, device, log=log, team=team)
        if not resume and team.is_main:  # a long run says so before it starts (genaf.estimate)
            from .estimate import announce_cost

            note = announce_cost(trainer.model, trainer.data, trainer.stages, meth.cfg, tcfg.batch_size, trainer.device)
            if note:
                _warn(log, note)
        artifacts = trainer.fit(resume=resume)
        seconds = time.time() - t0
        model.to("cpu").to(memory_format=torch.contiguous_format)
        if main:
            save_model(model, out)
            write_json(out / "history.json", trainer.history)
            for key, setup in artifacts.get("setup", {}).items():
                if "sensitivity" in setup:
                    write_json(out / "sensitivity.json", {**setup, **artifacts.get("finish", {}).get(key, {})})
        res = evaluate_model(
            model.to(device),
            dm.test,
            whitebox=cfg["eval"]["whitebox"],
            device=device,
            batch_size=cfg["eval"]["batch_size"],
            seed=cfg["seed"],
            log=log,
            parallel=team,
        )
    if determinism["nondeterministic_ops"]:
        _warn(log, "deterministic mode: ops without a deterministic kernel ran: " + "; ".join(
            determinism["nondeterministic_ops"]))
    metrics = {
        **res["metrics"],
        "method": cfg["method"],
        "encoder": cfg["encoder"],
        "encoder_hash": start_hash,
        "encoder_files": cfg.get("encoder_files", []),
        "dataset": cfg["dataset"],
        "seed": cfg["seed"],
        "weight_drift": weight_drift(model, {k: v.to(device) for k, v in start.items()}),
        "train_seconds": round(seconds, 1),
        **({"continued_from": cfg["continued_from"]} if "continued_from" in cfg else {}),
        "selected_epochs": artifacts.get("selected_epoch", {}),
        "budget": trainer.budget(),
        "attack_fold": trainer.attack_fold,  # BatchNorm folded for the training attacks (train.fold_bn)
        "data": cfg["data_info"],
        "determinism": determinism,
        "versions": versions(),
    }
    if team.distributed:
        metrics["distributed"] = {
            **team.describe(),
            "per_process_batch": tcfg.batch_size // team.world,
            "ddp_batchnorm": tcfg.ddp_batchnorm,
            **trainer.parallel_info,
            **({"genetic_batch": meth.cfg["genetic_batch"]} if "genetic_batch" in meth.cfg else {}),
            "communication": team.communication(),
        }
    if main:
        write_json(out / "predictions.json", res["per_sample"])
        write_json(out / "metrics.json", metrics)
        if not tcfg.keep_checkpoint:  # the run is complete: its final model and metrics are on disk
            (out / "checkpoint.pt").unlink(missing_ok=True)
    if team.distributed:  # every process returns what rank 0 wrote
        metrics = team.broadcast_json(metrics)
    return metrics


def surrogate_record(surrogate: ImageSet) -> dict:
    """What a perturbation records of the images it was crafted from: dataset, split, count,
    and the dataset indices (and their digest), so that disjointness can be checked later."""
    from .data.module import index_digest

    idx = surrogate.indices.to(torch.int64).cpu()
    return {
        "dataset": surrogate.dataset,
        "split": surrogate.split,
        "n": len(surrogate),
        "indices_sha256": index_digest(idx),
        "indices": idx.tolist(),
    }


def stale_reasons(
    pert: Perturbation,
    *,
    attack: str,
    eps: float,
    seed: int,
    preset: str,
    options: dict,
    encoder: Encoder,
    surrogate: ImageSet,
) -> list[str]:
    """Why a cached perturbation is not the one these settings would craft (empty: it is)."""
    why = []
    if pert.attack != attack:
        why.append(f"attack {pert.attack} != {attack}")
    if abs(float(pert.eps) - float(eps)) > 1e-9:
        why.append(f"eps {pert.eps:.6f} != {eps:.6f}")
    if int(pert.seed) != int(seed):
        why.append(f"seed {pert.seed} != {seed}")
    if pert.config.get("preset") != preset:
        why.append(f"preset {pert.config.get('preset')} != {preset}")
    for k, v in options.items():
        if pert.config.get(k) != v:
            why.append(f"{k} {pert.config.get(k)!r} != {v!r}")
    h = encoder_hash(encoder)
    if pert.encoder_hash != h:
        why.append(f"crafted on encoder {pert.encoder_hash or '?'}, not {h}")
    rec = pert.config.get("surrogate_data") or {}
    want = surrogate_record(surrogate)
    if rec.get("indices_sha256") != want["indices_sha256"] or rec.get("dataset") != want["dataset"]:
        why.append("crafted from other surrogate images")
    return why


def craft(
    encoder: str | Encoder,
    attack: str,
    surrogate: ImageSet,
    eps: float,
    preset: str = "cpu",
    seed: int = 0,
    surrogate_name: str = "",
    device: str = "auto",
    out: str | Path | None = None,
    log=None,
    dist_backend: str = "auto",
    **cfg: Any,
) -> Perturbation:
    """Craft a universal perturbation with ``attack`` on ``encoder`` from surrogate images.

    ``surrogate`` must come from a dataset's surrogate reserve (``data.surrogate(n)``): images
    that no downstream train/validation split uses. Images of a train, validation or test split
    are refused, since a defender trains or reports on them. The images' dataset, count and
    indices are recorded in ``pert.config['surrogate_data']``.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls ``craft`` alike: the process group is
    started (``dist_backend``: auto is nccl on CUDA devices, gloo on CPUs), each process crafts on
    its rows of every surrogate batch (or, for ``uap``, ``fff`` and ``uniform-noise``, the whole
    perturbation), only rank 0 writes ``out``, and every process returns rank 0's perturbation
    (docs/DISTRIBUTED.md).
    """
    check_eps(eps)
    if not isinstance(surrogate, ImageSet):
        raise ConfigError(f"craft wants the surrogate images as an ImageSet (data.surrogate(n)), got {type(surrogate)}")
    if surrogate.split != "surrogate":
        raise ConfigError(
            f"craft draws the attacker's images from a surrogate reserve, but these are {len(surrogate)} images of "
            f"the {surrogate.split} split of {surrogate.dataset or 'a dataset'}, which a defender trains or "
            "reports on; "
            "pass data.surrogate(n) of this dataset or of another one"
        )
    if len(surrogate) == 0:
        raise DataError("craft got no surrogate images")
    enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
    check_image_size(getattr(enc, "meta", {}), tuple(surrogate.images.shape[-2:]))
    warn_native_size(getattr(enc, "meta", {}), tuple(surrogate.images.shape[-2:]))
    if dist_backend not in BACKENDS:
        raise ConfigError(f"dist_backend must be one of {', '.join(BACKENDS)}, got '{dist_backend}'")
    dev = resolve_device(device)
    team = SOLO
    if launched():  # torchrun: one of several processes (genaf.distributed, docs/DISTRIBUTED.md)
        team, dev = init_team(dev, dist_backend)
    try:
        return _craft_team(enc, attack, surrogate, eps, preset, seed, surrogate_name, dev, out, log, team, cfg)
    finally:
        team.close()


def _craft_team(enc, attack, surrogate, eps, preset, seed, surrogate_name, dev, out, log, team, cfg) -> Perturbation:
    """``craft`` once the inputs are checked: on one process, or on each of a torchrun run's."""
    from .utils import set_quiet

    enc = enc.to(dev)
    att = create_attack(attack, enc, preset=preset, eps=eps, seed=seed, **cfg)
    if not hasattr(att, "fit"):
        raise ConfigError(
            f"attack '{attack}' is per-sample (it perturbs each image on its own): it has no universal "
            "perturbation to craft; evaluate it with genaf evaluate --attack {attack} (crafted per test image on "
            "the original encoder)".replace("{attack}", attack)
        )
    record = surrogate_record(surrogate)
    name = surrogate_name or f"{surrogate.dataset} surrogate reserve ({len(surrogate)} images)"
    quiet = team.distributed and not team.is_main  # rank 0 alone reports progress
    was_quiet = set_quiet(True) if quiet else None
    try:
        pert = att.fit(surrogate, device=dev, surrogate=name, log=None if quiet else log, parallel=team)
    finally:
        if quiet:
            set_quiet(was_quiet)
    pert.config["seconds"] = round(getattr(att, "seconds", 0.0), 2)
    pert.config["images_seen"] = int(getattr(att, "images_seen", 0) or 0)
    pert.config["surrogate_data"] = record
    if team.distributed:
        pert.config["distributed"] = {**team.describe(), "crafting": getattr(att, "parallel_mode", "replicated")}
        # the processes hold the same δ by construction (sharded) or by the same computation
        # (replicated); rank 0's is sent to all the same, so every process returns one perturbation
        team.broadcast_(pert.delta)
        if pert.mask is not None:
            team.broadcast_(pert.mask)
        pert.config = team.broadcast_json(pert.config)
    if out is not None:
        from .utils import perturbation_path

        path, note = perturbation_path(out)  # a perturbation is a safetensors file: its name says so
        if note and team.is_main:
            _warn(log, note)
        team.on_main(pert.save, path)  # rank 0 writes; its error, if any, stops every process
    return pert


def _wb_config(cfg: dict, whitebox: bool, autoattack: bool | str) -> dict | None:
    """The white-box settings of a run's config; ``autoattack`` switches AutoAttack on (a
    string names its version, ``standard`` or ``apgd``)."""
    from .attacks.autoattack import VERSIONS
    from .config import DEFAULTS

    if not (whitebox or autoattack):
        return None
    wb = {**DEFAULTS["eval"]["whitebox"], **(cfg["eval"].get("whitebox") or {})}
    if not autoattack:
        return wb
    version = autoattack if isinstance(autoattack, str) else wb.get("autoattack_version", "standard")
    if version not in VERSIONS:
        raise ConfigError(f"unknown AutoAttack version '{version}'; choose one of: {', '.join(VERSIONS)}")
    return {**wb, "autoattack": True, "autoattack_version": version}


def craft_per_sample(
    encoder: str | Encoder,
    attack: str,
    preset: str = "cpu",
    seed: int = 0,
    device: str | torch.device = "auto",
    expected_hash: str | None = None,
    **cfg: Any,
):
    """A per-sample DAE on the *original* encoder: returns ``(fn, description)`` where
    ``fn(x) -> x_adv`` perturbs a [0,1] batch on that encoder alone (no head, no labels).

    ``expected_hash``: the hash of the encoder a run was fine-tuned from; an encoder spec that
    now loads other weights is refused (the attack would run on another encoder)."""
    enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
    h = encoder_hash(enc)
    if expected_hash and h != expected_hash:
        raise CheckpointError(
            f"the run was fine-tuned from an encoder with hash {expected_hash} but '{encoder}' now loads {h}: "
            "a per-sample DAE must be crafted on the original encoder; point the spec at that file"
        )
    dev = resolve_device(device) if isinstance(device, str) else device
    enc = enc.to(dev).eval()
    att = create_attack(attack, enc, preset=preset, seed=seed, **cfg)
    if hasattr(att, "fit"):
        raise ConfigError(
            f"attack '{attack}' is universal: craft it once with genaf attack and pass the file with --perturbation"
        )
    desc = {
        "attack": attack,
        "eps": float(att.eps),
        "preset": preset,
        "config": {k: v for k, v in getattr(att, "cfg", {}).items() if isinstance(v, (int, float, str, bool))},
        "encoder_hash": h,
        "crafted_on": enc.meta.get("source", "") if hasattr(enc, "meta") else "",
        "seed": seed,
    }

    def run(x: torch.Tensor) -> torch.Tensor:
        return att(x.to(dev)).to(x.device)

    return run, desc


def _writable(path: Path) -> bool:
    """Whether a file can be written at ``path`` (tried for real: permissions, a read-only file
    system, a missing folder), before any work whose result would be lost."""
    import tempfile

    if path.exists() and not os.access(path, os.W_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            return True
    except OSError:
        return False


def evaluate(
    run_dir: str | Path,
    perturbations: dict[str, Perturbation | str | Path] | None = None,
    dataset: str | None = None,
    datamodule: DataModule | None = None,
    device: str = "auto",
    whitebox: bool = False,
    autoattack: bool | str = False,
    resize: str | None = None,
    per_sample: list[str] | dict[str, dict] | None = None,
    split: str = "test",
    out: str | Path | None = None,
    preset: str = "cpu",
    adversarial: dict | None = None,
    log=None,
) -> dict:
    """Evaluate a finished run against universal perturbations and per-sample DAEs.

    Every entry names the dataset, split and perturbation it was measured on.

    - ``split="test"`` (default): entries are merged into the run's ``metrics.json``;
      ``split="val"``: into its ``validation`` section (what selection decisions may use).
    - ``per_sample``: attack names (or name -> options) of per-sample DAEs, crafted for each
      evaluated image on the run's *original* encoder (its hash is checked);
      ``adversarial``: per-sample DAEs crafted beforehand, name -> (images aligned with the
      evaluated split, description) (the bench caches them across methods).
    - ``dataset``: another dataset than the run's own. Its numbers never enter the run's
      record: ``out`` (a JSON file) is then required. ``out`` also serves a read-only run
      directory; the run's ``metrics.json`` is then left as it is.
    Returns the metrics written.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a genaf run directory (no config.yaml)")
    from .config import safe_yaml

    cfg = safe_yaml((run_dir / "config.yaml").read_bytes(), str(run_dir / "config.yaml"))
    if not isinstance(cfg, dict) or "dataset" not in cfg:
        raise CheckpointError(f"{run_dir / 'config.yaml'} is empty or not a genaf run configuration")
    if split not in ("test", "val"):
        raise ConfigError(f"split must be 'test' or 'val', got '{split}'")
    own = cfg["dataset"]
    other = bool(dataset) and dataset != own
    if other:
        if out is None:
            raise ConfigError(
                f"{run_dir} was fine-tuned on {own}; numbers measured on {dataset} do not belong in its metrics.json: "
                "write them to their own file with --out FILE"
            )
        cfg["dataset"] = dataset
    metrics_path = Path(out) if out is not None else run_dir / "metrics.json"
    if out is None and not _writable(metrics_path):
        raise CheckpointError(
            f"{metrics_path} is not writable; nothing was evaluated. Write the results elsewhere with --out FILE"
        )
    if out is not None and (metrics_path.is_dir() or not _writable(metrics_path)):
        raise CheckpointError(f"--out {metrics_path} is a folder or not writable; name a writable JSON file")
    dev = resolve_device(device)
    model = load_model(run_dir, dev)
    dm = datamodule if datamodule is not None else data_from_config(cfg)
    images = dm.test if split == "test" else dm.val
    perts = {}
    for name, p in (perturbations or {}).items():
        perts[name] = p if isinstance(p, Perturbation) else Perturbation.load(p)
        if resize is not None:
            perts[name].resize = resize
    run_metrics_path = run_dir / "metrics.json"
    run_metrics = json.loads(run_metrics_path.read_text()) if run_metrics_path.is_file() else {}
    adversarial = dict(adversarial or {})
    items = per_sample.items() if isinstance(per_sample, dict) else ((n, {}) for n in (per_sample or []))
    for name, opts in items:
        opts = dict(opts or {})
        attack = opts.pop("attack", name)
        adversarial[name] = craft_per_sample(
            cfg["encoder"],
            attack,
            preset=opts.pop("preset", preset),
            seed=cfg["seed"],
            device=dev,
            expected_hash=run_metrics.get("encoder_hash"),
            **opts,
        )
    res = evaluate_model(
        model,
        images,
        perts,
        whitebox=_wb_config(cfg, whitebox, autoattack),
        device=dev,
        batch_size=cfg["eval"]["batch_size"],
        seed=cfg["seed"],
        start_encoder_hash=run_metrics.get("encoder_hash"),
        check_whitebox=cfg["eval"]["whitebox"],
        adversarial=adversarial,
        split_indices=None if other else {"train": dm.train.indices, "val": dm.val.indices},
        log=log,
        reuse_checks=(run_metrics if split == "test" else run_metrics.get("validation") or {}).get("checks"),
    )
    new = res["metrics"]
    if out is not None:
        base = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        if base and base.get("run") not in (None, str(run_dir)):
            raise ConfigError(f"--out {metrics_path} holds the results of another run ({base.get('run')})")
        if base and base.get("evaluated_on", {}).get("dataset") not in (None, new["evaluated_on"]["dataset"]):
            raise ConfigError(f"--out {metrics_path} holds results measured on another dataset")
    else:
        base = run_metrics
    section = base if split == "test" else base.setdefault("validation", {})
    if section and "clean_acc" in section and abs(section["clean_acc"] - new["clean_acc"]) > 1e-9:
        raise CheckpointError(
            f"clean accuracy of {run_dir} on its {split} split changed on re-evaluation "
            f"({section['clean_acc']:.4f} -> {new['clean_acc']:.4f}); is the data the same?"
        )
    check_no_name_collision(section.get("attacks") or {}, new["attacks"], metrics_path)
    for k in ("robust_acc", "fooling_rate", "attack_success_rate", "relative_decline", "attacks"):
        section.setdefault(k, {}).update(new[k])
    if "checks" in new:
        section["checks"] = new["checks"]
    section["clean_acc"] = new["clean_acc"]
    section["n_test" if split == "test" else "n_val"] = new["n_test"]
    section["evaluated_on"] = new["evaluated_on"]
    if out is not None:
        base.setdefault("run", str(run_dir))
    base.setdefault("seed", cfg["seed"])
    base.setdefault("versions", versions())
    write_json(metrics_path, base)
    return base
