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
FREE_SECTIONS = ("method_config", "train")  # checked by the method and by TrainConfig


# Bounds on what a YAML file may expand to: a config is a few hundred values; a 1 KB file of
# nested aliases ("billion laughs") would otherwise expand to gigabytes.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


def safe_yaml(text: str | bytes, what: str = "YAML") -> Any:
    """``yaml.safe_load`` with bounds: the size of the text, the number of values after every
    alias is expanded, the nesting depth; recursive aliases and binary data are refused. Every
    failure is a one-line ConfigError naming ``what``."""
    if isinstance(text, bytes):
        if b"\x00" in text:
            raise ConfigError(f"{what} is a binary file, not YAML text")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} is not UTF-8 text (byte {exc.start}); is it a binary file?") from exc
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} is {len(text)} bytes; a configuration is at most {MAX_YAML_BYTES} bytes")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError as exc:
        raise ConfigError(f"{what} nests deeper than this reader allows (at most {MAX_YAML_DEPTH} levels)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {first_line(exc)}") from exc
    if node is None:
        return None
    _bound(node, what)
    try:
        return yaml.load(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{what} is not valid YAML: {first_line(exc)}") from exc


def _bound(root, what: str) -> None:
    """Count the values of the composed node graph as construction would expand them (an alias
    counts its whole target every time it is used), refusing cycles, depth and size."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{what} nests deeper than {MAX_YAML_DEPTH} levels")
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{what} holds a recursive alias (an anchor used inside itself)")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            n = 1
        active.discard(key)
        if n > MAX_YAML_NODES:
            raise ConfigError(
                f"{what} expands to more than {MAX_YAML_NODES} values (aliases used inside aliases?); "
                "a configuration needs far fewer"
            )
        sizes[key] = n
        return n

    size(root, 0)


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML or a non-mapping is a one-line
    ConfigError that names ``what`` the file was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path} is {path.stat().st_size} bytes; a configuration is at most {MAX_YAML_BYTES}")
    obj = safe_yaml(path.read_bytes(), f"{what} {path}") or {}
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
            # the fixed sections (data, eval and everything inside them) know their keys;
            # method_config and train are checked by the method and by TrainConfig
            fixed = strict_keys is not None and k not in FREE_SECTIONS
            out[k] = merge(out[k], v, f"{where}.{k}", set(out[k]) if fixed else None)
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


def typed_fields(cls, values: dict, where: str) -> dict:
    """``values`` for the dataclass ``cls``: unknown keys are an error naming the closest field,
    and every value takes its field's type (YAML and --set hand over '1e-3' or 3 for 3.0)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(f"unknown key '{k}' in {where}{did_you_mean(k, fields)}; known keys: {', '.join(fields)}")
        default = fields[k].default
        out[k] = coerce_like(v, default, f"{where}.{k}")
    return out


def coerce_like(value: Any, default: Any, where: str) -> Any:
    """``value`` with the type of ``default`` (bool, int, float or str), or a ConfigError."""
    import math

    if value is None or default is None or default is dataclasses_missing():
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        from .utils import parse_fraction

        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            num = parse_fraction(value) if isinstance(value, str) else float(value)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where} must be a number, got {value!r}") from exc
        if not math.isfinite(num):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if isinstance(default, int):
            if num != int(num):
                raise ConfigError(f"{where} must be a whole number, got {value!r}")
            return int(num)
        return num
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be text, got {value!r}")
    return value


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


def parse_assignments(items: list[str] | None) -> dict:
    """``["lam=1", "space=features"]`` -> ``{"lam": 1, "space": "features"}`` (YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"option '{item}' must look like key=value")
        k, v = item.split("=", 1)
        val = safe_yaml(v, f"the value of '{item}'")
        if isinstance(val, str):  # YAML 1.1 reads '1e5' as a string
            try:
                val = float(val) if "/" not in val else val
            except ValueError:
                pass
        out[k.strip()] = val
    return out
