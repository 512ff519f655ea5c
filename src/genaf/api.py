"""The Python API the README teaches. Raises typed errors (``genaf.errors``); never exits.

enc = genaf.load_encoder("demo")
data = genaf.load_dataset("fashion-mnist", n_train=3000, n_val=1000, n_test=2000)
run = genaf.finetune("demo", "fashion-mnist", method="genaf", out="runs/genaf")
pert = genaf.craft("demo", "l4a-base", data.surrogate(2000), eps=16/255)
metrics = genaf.evaluate("runs/genaf", perturbations={"l4a": pert})
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .attacks import Perturbation, create_attack
from .attacks.universal import encoder_hash
from .config import resolve
from .data import DataModule, ImageSet, load_dataset
from .encoders import Encoder, load_encoder
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate_model
from .methods.base import create_method
from .models import DownstreamModel, load_model, save_model
from .train import TrainConfig, Trainer
from .utils import atomic_write, check_eps, resolve_device, seed_everything, unit_seed, versions, write_json

__all__ = ["load_encoder", "load_dataset", "load_model", "finetune", "craft", "evaluate", "data_from_config"]


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
    )


def _check_layer_counts(mcfg: dict, model: DownstreamModel) -> None:
    """Fail before training when a stage would later ask for more layers than the model has."""
    from .methods.sensitivity import weight_units

    n = len(weight_units(model))
    for key in ("stage2_k", "rift_k"):
        k = int(mcfg.get(key) or 0)
        if k > n:
            raise ConfigError(f"{key}={k} but the model has only {n} Conv2d/Linear layers; choose {key} <= {n}")


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
) -> dict:
    """Fine-tune ``encoder`` on ``dataset`` with ``method``; write a run directory at ``out``.

    The run directory holds ``model.safetensors`` + ``model.json`` (``load_model``),
    ``config.yaml`` (the resolved configuration), ``metrics.json`` (clean and white-box
    robust accuracy on the test split), ``history.json``, ``checkpoint.pt`` and, for
    ``genaf``, ``sensitivity.json``. Returns the metrics dict.
    """
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
    if resume and not (out / "checkpoint.pt").is_file():
        raise CheckpointError(f"--resume: {out} has no checkpoint.pt to resume from")
    if not resume and (out / "checkpoint.pt").is_file():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    meth = create_method(cfg["method"], **cfg["method_config"])
    cfg["method_config"] = dict(meth.cfg)
    tcfg = TrainConfig(**{"seed": cfg["seed"], **cfg["train"]})
    tcfg.validate()
    cfg["train"] = {k: getattr(tcfg, k) for k in tcfg.__dataclass_fields__}
    device = resolve_device(tcfg.device)
    seed_everything(cfg["seed"])
    enc = load_encoder(cfg["encoder"])
    dm = datamodule if datamodule is not None else data_from_config(cfg)
    cfg["data_info"] = dm.info
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=False)))
    torch.manual_seed(unit_seed(cfg["seed"], "head-init"))
    model = DownstreamModel(enc, dm.num_classes, cfg["head"])
    _check_layer_counts(meth.cfg, model)
    start = {k: v.detach().clone() for k, v in model.encoder.named_parameters()}
    start_hash = encoder_hash(enc)
    t0 = time.time()
    trainer = Trainer(model, dm, meth, tcfg, out, device, log=log)
    artifacts = trainer.fit(resume=resume)
    seconds = time.time() - t0
    model.to("cpu").to(memory_format=torch.contiguous_format)
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
    )
    metrics = {
        **res["metrics"],
        "method": cfg["method"],
        "encoder": cfg["encoder"],
        "encoder_hash": start_hash,
        "dataset": cfg["dataset"],
        "seed": cfg["seed"],
        "weight_drift": weight_drift(model, {k: v.to(device) for k, v in start.items()}),
        "train_seconds": round(seconds, 1),
        "selected_epochs": artifacts.get("selected_epoch", {}),
        "versions": versions(),
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "predictions.json", res["per_sample"])
    return metrics


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
    **cfg: Any,
) -> Perturbation:
    """Craft a universal perturbation with ``attack`` on ``encoder`` from surrogate images."""
    check_eps(eps)
    enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
    dev = resolve_device(device)
    enc = enc.to(dev)
    att = create_attack(attack, enc, preset=preset, eps=eps, seed=seed, **cfg)
    if not hasattr(att, "fit"):
        raise ConfigError(
            f"attack '{attack}' is per-sample (it perturbs each image on its own): it has no universal "
            "perturbation to craft; choose a universal attack"
        )
    pert = att.fit(surrogate, device=dev, surrogate=surrogate_name, log=log)
    pert.config["seconds"] = round(getattr(att, "seconds", 0.0), 2)
    pert.config["images_seen"] = int(getattr(att, "images_seen", 0) or 0)
    if out is not None:
        pert.save(out)
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


def evaluate(
    run_dir: str | Path,
    perturbations: dict[str, Perturbation | str | Path] | None = None,
    dataset: str | None = None,
    datamodule: DataModule | None = None,
    device: str = "auto",
    whitebox: bool = False,
    autoattack: bool | str = False,
    resize: str | None = None,
) -> dict:
    """Evaluate a finished run against perturbations; adds one entry per perturbation to its
    ``metrics.json`` and returns the updated metrics."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a genaf run directory (no config.yaml)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if dataset:
        cfg["dataset"] = dataset
    dev = resolve_device(device)
    model = load_model(run_dir, dev)
    dm = datamodule if datamodule is not None else data_from_config(cfg)
    perts = {}
    for name, p in (perturbations or {}).items():
        perts[name] = p if isinstance(p, Perturbation) else Perturbation.load(p)
        if resize is not None:
            perts[name].resize = resize
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    res = evaluate_model(
        model,
        dm.test,
        perts,
        whitebox=_wb_config(cfg, whitebox, autoattack),
        device=dev,
        batch_size=cfg["eval"]["batch_size"],
        seed=cfg["seed"],
        start_encoder_hash=metrics.get("encoder_hash"),
        check_whitebox=cfg["eval"]["whitebox"],
    )
    new = res["metrics"]
    if metrics and abs(metrics.get("clean_acc", new["clean_acc"]) - new["clean_acc"]) > 1e-9 and not dataset:
        raise CheckpointError(
            f"clean accuracy of {run_dir} changed on re-evaluation "
            f"({metrics['clean_acc']:.4f} -> {new['clean_acc']:.4f}); is the data the same?"
        )
    merged = dict(metrics) if metrics else {k: v for k, v in new.items()}
    for k in ("robust_acc", "fooling_rate", "attack_success_rate", "relative_decline", "attacks"):
        merged.setdefault(k, {}).update(new[k])
    if "checks" in new:
        merged["checks"] = new["checks"]
    merged["clean_acc"] = new["clean_acc"]
    merged["n_test"] = new["n_test"]
    merged.setdefault("seed", cfg["seed"])
    merged.setdefault("versions", versions())
    write_json(metrics_path, merged)
    return merged
