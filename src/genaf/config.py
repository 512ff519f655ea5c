"""Run configuration: defaults, YAML files (safe loader), overrides, validation, resolution."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean, first_line

DEFAULTS: dict[str, Any] = {
    "encoder": "demo",
    "dataset": "fashion-mnist",
    "method": "genaf",
    "seed": 0,
    "head": "mlp",
    "data": {
        "root": None,
        "image_size": None,
        "n_train": None,
        "n_val": None,
        "n_test": None,
        "download": False,
        "surrogate_reserve": None,
    },
    "method_config": {},
    "train": {},
    "eval": {
        "whitebox": {
            "eps": 8 / 255,
            "step": 2 / 255,
            "steps": 10,
            "restarts": 1,
            "fgsm": True,
            "autoattack": False,  # the strongest, slowest white-box evaluation
            "autoattack_version": "standard",  # APGD-CE, APGD-T, FAB-T, Square; "apgd": the first two
            "autoattack_steps": 100,
            "autoattack_queries": 5000,  # Square's queries (standard version)
        },
        "batch_size": 512,
    },
}
TOP_KEYS = set(DEFAULTS)


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML or a non-mapping is a one-line
    ConfigError that names ``what`` the file was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        obj = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {first_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return obj


def merge(base: dict, override: dict, where: str = "config", strict_keys: set | None = None) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if strict_keys is not None and k not in strict_keys:
            raise ConfigError(
                f"unknown key '{k}' in {where}{did_you_mean(k, strict_keys)}; "
                f"known keys: {', '.join(sorted(strict_keys))}"
            )
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            sub_keys = set(out[k]) if k in ("data", "eval") else None
            out[k] = merge(out[k], v, f"{where}.{k}", sub_keys)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve(file_cfg: dict | None = None, **overrides: Any) -> dict:
    """DEFAULTS <- YAML file <- explicit overrides (None values are ignored)."""
    cfg = merge(DEFAULTS, file_cfg or {}, "config file", TOP_KEYS)
    clean = {k: v for k, v in overrides.items() if v is not None}
    for k in ("data", "method_config", "train", "eval"):
        if k in clean:
            clean[k] = {kk: vv for kk, vv in clean[k].items() if vv is not None}
    return merge(cfg, clean, "options", TOP_KEYS)


def parse_assignments(items: list[str] | None) -> dict:
    """``["lam=1", "space=features"]`` -> ``{"lam": 1, "space": "features"}`` (YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"option '{item}' must look like key=value")
        k, v = item.split("=", 1)
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot read the value of '{item}'") from exc
        if isinstance(val, str):  # YAML 1.1 reads '1e5' as a string
            try:
                val = float(val) if "/" not in val else val
            except ValueError:
                pass
        out[k.strip()] = val
    return out
