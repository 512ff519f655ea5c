"""``genaf bench``: the experiment matrix encoders × datasets × methods × attacks × ε × seeds.

One YAML file (read with the safe loader) describes the whole matrix; ``run_bench`` runs it,
writes ``OUT/results.csv``, ``OUT/results.json`` and ``OUT/report.md`` (with PNG plots, see
:mod:`genaf.bench_report`), and can be killed at any moment and started again.

Configuration (every key is optional except ``methods`` and ``attacks``; an unknown key is a
:class:`~genaf.errors.ConfigError` naming the closest known one)::

    name: bench-small              # title of the report
    device: auto                   # auto | cpu | cuda (for fine-tuning, crafting and evaluation)
    encoders: [demo]               # encoder specs (genaf.load_encoder), or {label: spec};
                                   # $VARS in specs are expanded when the encoder is loaded
    data: {root: null, download: false, image_size: null}   # defaults of every dataset entry
    datasets:                      # names (DATASETS or imagefolder:PATH), or mappings:
      - fashion-mnist
      - {name: fashion-mnist, label: fmnist-500, n_train: 500, n_val: 500, n_test: 2000,
         image_size: null, root: null, download: false}
    surrogate:                     # the attacker's images: the surrogate pool of a dataset,
      dataset: fashion-mnist       #   i.e. training images used by no downstream train/val split
      n: 2000                      #   of the same dataset and seed (default: the first dataset)
      image_size: null             #   default: data.image_size
      resize: none                 #   none | bilinear: perturbations on images of another size
    head: mlp                      # mlp | linear: the downstream head
    method_defaults: {epochs: 4}   # options given to every method that has them
    methods:                       # label -> options of genaf.methods (or a list of names);
      sft: {}                      #   'method' names the registered method, so that variants
      sft-highlr: {method: sft, encoder_lr: 1e-3}   # such as the drift control get their own label
      genaf: {stage2_epochs: 2}
    attack_preset: cpu             # cpu | paper: the default preset of every attack
    attacks:                       # label -> options (or a list of names); 'attack' names the
      l4a-base: {}                 #   registered attack, 'preset' overrides attack_preset and
      uap: {preset: paper, eps: 10/255}   # 'eps' (a number or a list) overrides the grid below
    eps: [16/255]                  # the DAE budgets (numbers or "a/b" strings); "preset" (the
                                   # default): each attack's preset ε
    seeds: [0, 1]                  # each seed: its own data split, head init, training and DAEs
    train: {batch_size: 128, n_val_robust: 256, val_steps: 5}   # genaf.train.TrainConfig fields
    eval: {batch_size: 512}
    whitebox: true                 # also white-box PGD (and FGSM) on every fine-tuned model;
                                   # a mapping sets eps, step, steps, restarts, fgsm, autoattack
    fresh_head: false              # true or lp options: freeze each defended encoder, train a
                                   # new head (lp) and attack that model with the same DAEs
    selfattack: false              # true or a list of attack labels: DAEs crafted on each
                                   # defended encoder itself (a white-box universal attack)
    budget_controls: true          # true | false | [sft/at labels]: those methods again at
                                   # Gen-AF's total epochs (LABEL-budget); each continues its
                                   # base run from that run's last epoch once it has finished
                                   # (genaf.finetune(continue_from=...): the same rows as a run
                                   # from scratch, which it is when the base is not done yet)

Cells and rows. A cell is (encoder, dataset, method, setting, attack, eps, seed), where
``setting`` is ``dae`` (DAEs crafted on the original encoder, the threat model), ``whitebox``,
``fresh-head`` or ``self-attack``. Each has one row: clean_acc, robust_acc, fooling_rate,
attack_success_rate (1 − robust_acc), relative_decline ((clean − robust) / clean), drift
(the encoder's relative weight drift ‖θ−θ0‖/‖θ0‖), the evaluation self-checks, and the
wall seconds of training, crafting and evaluation. Rows are kept in a canonical order (the
order of the configuration, seeds innermost), so two runs of one configuration give
identical files apart from the ``*_seconds`` columns. Note that the thread count and the
device change floating-point results: compare runs made on the same kind of machine.

Caching and resuming. A universal perturbation is crafted once per (encoder, attack,
surrogate, ε, seed) into ``OUT/perturbations/`` and a model is fine-tuned once per (encoder,
dataset, method, seed) into ``OUT/runs/``; both directory names carry a short hash of every
option that shapes them, the sha256 of the encoder's files included, so an edited
configuration or a replaced encoder file never reuses a stale file. Every file
is written atomically (temporary file + rename), and a cell is done only once its row is in
``results.json``. Killed at any moment (``kill -9`` included), the next ``genaf bench`` with
the same configuration and output skips the done cells, reloads finished perturbations and
models, resumes an interrupted fine-tune from its last epoch checkpoint
(``genaf.finetune(..., resume=True)``) and gives the same rows as an uninterrupted run.
A lock file stops two runs from writing into one output folder at once.

The encoder lock. ``OUT/encoders.lock.json`` records, for each encoder label, its spec and
every local file it reads (the weights, solo-learn's ``args.json`` when present, an HF folder's
JSON files, the shipped asset of ``demo`` and ``demo-vit``) with sha256 and size; ``random:``
reads no file, and weights from a hub cache are not locked (its ``note`` says so). The first
run into OUT writes it; every later run (and each shard) hashes the files again (streamed, once
per process per path, size and modification time) and compares: a changed, missing or new file
is refused with a :class:`~genaf.errors.CheckpointError` naming the label, the file and both
hashes. ``--update-lock`` (``run_bench(..., update_lock=True)``) accepts the new bytes, rewrites
the lock (the replaced hashes are kept under ``replaced``) and logs what they invalidate: since
the cache keys hold the files' sha256, that encoder's rows, fine-tune runs, perturbations and
per-sample DAE images are made again (the old ones stay on disk until deleted). A new label, or
a label given another spec, just gets its entry. The lock is read and written under an
exclusive file lock, so shards starting at once create it once.

Sharding (a SLURM job array, or any scheduler that starts N copies on a shared filesystem).
``run_bench(..., shard=(I, N))`` (``genaf bench CONFIG --out DIR --shard I/N``, I in 0..N-1)
runs the units (encoder, dataset, method, seed) whose position in the canonical order is
I modulo N: a deterministic share, disjoint from every other shard's, so no two workers ever
fine-tune the same model or compute the same cell. A shard writes its rows to
``OUT/shards/I-of-N.json`` only; inputs that several units share (a universal perturbation,
the per-sample DAE images) are made under a per-file lock by whichever shard needs them first
and read by the others; before waiting on another shard's lock, a shard makes the inputs of its
unit that nobody is making yet, starting at its own place in the list (``Bench.claim_inputs``),
so shards reaching a seed together craft its perturbations side by side. When a shard finds
every cell of the configuration done (it is the last to finish), or when ``genaf report OUT``
is run after all shards finished, the shard files are merged into ``OUT/results.json`` /
``results.csv`` and the report is written: the same files as one unsharded run (apart from the
``*_seconds`` columns). While shards hold the folder, an unsharded run or a merge is refused.

Ray. ``run_bench(..., ray=True)`` (``genaf bench CONFIG --out DIR --ray [ADDRESS]``, the ``ray``
extra) runs the units as Ray tasks, each like a shard of one unit, after a wave of tasks that
craft the perturbations they share; the driver merges the shard files (:mod:`genaf.bench_ray`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError, ConfigError, GenafError, did_you_mean
from .utils import Progress, atomic_write, parse_fraction, write_json

TOP_KEYS = (
    "name",
    "device",
    "encoders",
    "data",
    "datasets",
    "surrogate",
    "head",
    "method_defaults",
    "methods",
    "attack_preset",
    "attacks",
    "eps",
    "seeds",
    "train",
    "eval",
    "whitebox",
    "fresh_head",
    "selfattack",
    "budget_controls",
)
DATA_KEYS = ("root", "download", "image_size", "surrogate_reserve")
DATASET_KEYS = ("name", "label", "n_train", "n_val", "n_test", *DATA_KEYS)
SURROGATE_KEYS = ("dataset", "label", "n", "reserve", "image_size", "root", "download", "resize")
WHITEBOX_KEYS = (
    "eps",
    "step",
    "steps",
    "restarts",
    "fgsm",
    "autoattack",
    "autoattack_version",
    "autoattack_steps",
    "autoattack_queries",
)
EVAL_KEYS = ("batch_size",)
SETTINGS = ("dae", "whitebox", "fresh-head", "self-attack")
COLUMNS = (
    "encoder",
    "dataset",
    "method",
    "setting",
    "attack",
    "eps",
    "seed",
    "clean_acc",
    "robust_acc",
    "fooling_rate",
    "attack_success_rate",
    "relative_decline",
    "val_clean_acc",
    "val_robust_acc",
    "drift",
    "total_epochs",
    "passes_per_image",
    "checks",
    "method_name",
    "attack_name",
    "train_seconds",
    "craft_seconds",
    "eval_seconds",
    "run",
    "perturbation",
    "fingerprint",
)
KEY_COLUMNS = ("encoder", "dataset", "method", "setting", "attack", "eps", "seed")
RESULTS_FORMAT = "genaf-bench-results"


# ---------------------------------------------------------------------------- configuration
def _fail(msg: str) -> ConfigError:
    return ConfigError(msg)


def _check_keys(obj: dict, known: tuple | list, where: str) -> None:
    for k in obj:
        if k not in known:
            raise _fail(f"unknown key '{k}' in {where}{did_you_mean(str(k), known)}; known keys: {', '.join(known)}")


def _mapping(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _fail(f"{where} must be a mapping, got {type(v).__name__} {v!r}")
    return dict(v)


def _label(text: str) -> str:
    """A file-system-safe label."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return out or "x"


def _named_entries(v: Any, where: str) -> list[tuple[str, dict]]:
    """A list of names, a list of {name: options}, or a mapping name -> options."""
    if isinstance(v, dict):
        items = list(v.items())
    elif isinstance(v, list):
        items = []
        for e in v:
            if isinstance(e, str):
                items.append((e, {}))
            elif isinstance(e, dict) and len(e) == 1:
                items.append(next(iter(e.items())))
            else:
                raise _fail(f"{where}: each entry must be a name or {{name: options}}, got {e!r}")
    else:
        raise _fail(f"{where} must be a mapping of name -> options or a list of names, got {v!r}")
    out, seen = [], set()
    for name, opts in items:
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}: names must be non-empty strings, got {name!r}")
        if name in seen:
            raise _fail(f"{where}: '{name}' appears twice")
        seen.add(name)
        if name != _label(name):
            raise _fail(f"{where}: label '{name}' may hold only letters, digits, '.', '_' and '-'")
        out.append((name, _mapping(opts, f"{where}.{name}")))
    if not out:
        raise _fail(f"{where} is empty")
    return out


def _eps_value(v: Any, where: str) -> float:
    from .utils import check_eps

    try:
        e = parse_fraction(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None
    except ConfigError as exc:
        raise _fail(f"{where}: {exc}") from exc
    if e is None:
        raise _fail(f"{where}: ε must be a number or 'a/b', got {v!r}")
    return check_eps(e, where)


def _eps_list(v: Any, where: str) -> list[float]:
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise _fail(f"{where} is empty")
    out = []
    for i, e in enumerate(vals):
        f = _eps_value(e, f"{where}[{i}]")
        if f not in out:
            out.append(f)
    return out


def _coerce_like(value: Any, default: Any, where: str) -> Any:
    """Give an attack option the type of its preset value ('1e-3' and '8/255' are numbers)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _fail(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            num = parse_fraction(value) if isinstance(value, str) else float(value)
        except (ConfigError, TypeError, ValueError) as exc:
            raise _fail(f"{where} must be a number, got {value!r}") from exc
        if isinstance(default, int):
            if num != int(num):
                raise _fail(f"{where} must be a whole number, got {value!r}")
            return int(num)
        return num
    return value


def check_encoder_spec(spec: str, where: str = "encoders") -> None:
    """Check an encoder spec's syntax (scheme and path parts) without loading anything."""
    from .encoders import SCHEMES

    if not isinstance(spec, str) or not spec:
        raise _fail(f"{where}: an encoder spec must be a non-empty string, got {spec!r}")
    scheme, _, rest = spec.partition(":")
    if scheme not in SCHEMES:
        raise _fail(
            f"{where}: unknown encoder spec scheme '{scheme}' in '{spec}'{did_you_mean(scheme, SCHEMES)}; "
            f"choose one of: {', '.join(SCHEMES)}"
        )
    if scheme in ("demo", "demo-vit", "demo-vit-mix") and rest:
        raise _fail(f"{where}: '{scheme}' takes no path (got '{spec}')")
    from .encoders.vit import VIT_ARCHS

    if scheme == "random" and rest not in ("", "demo", *VIT_ARCHS):
        raise _fail(f"{where}: random:NAME takes demo or a genaf ViT ({', '.join(VIT_ARCHS)}), got '{spec}'")
    if scheme in ("file", "solo") and not rest:
        raise _fail(f"{where}: '{spec}' needs a path: write {scheme}:PATH")
    if scheme == "torchvision":
        arch, sep, path = rest.partition(":")
        if not arch or not sep or not path:
            raise _fail(f"{where}: torchvision spec must be torchvision:ARCH:PATH, got '{spec}'")


def _check_dataset_name(name: Any, where: str) -> str:
    from .data.module import DATASETS

    if not isinstance(name, str) or not name:
        raise _fail(f"{where}: a dataset name must be a non-empty string, got {name!r}")
    if name.startswith("imagefolder:"):
        if not name.split(":", 1)[1]:
            raise _fail(f"{where}: write imagefolder:PATH")
        return name
    if name not in DATASETS:
        choices = [*DATASETS, "imagefolder:PATH"]
        raise _fail(
            f"{where}: unknown dataset '{name}'{did_you_mean(name, choices)}; choose one of: {', '.join(choices)}"
        )
    return name


def _encoder_label(spec: str) -> str:
    scheme, _, rest = spec.partition(":")
    if scheme in ("demo",):
        return "demo"
    if scheme == "random":
        return f"random-{rest or 'demo'}"
    if not rest:  # a bare name (demo-vit, a zoo name): the name itself
        return _label(scheme)
    path = rest.rsplit(":", 1)[-1]
    stem = Path(path).stem
    if stem in ("last", "model", "checkpoint", "encoder", "backbone"):  # solo-learn: <method>/last.ckpt
        stem = f"{Path(path).parent.name}-{stem}"
    return _label(stem)


def _attack_class(name: str):
    from .attacks.base import _ATTACKS, attack_names

    names = attack_names()
    if name not in names:
        raise _fail(f"unknown attack '{name}'{did_you_mean(name, names)}; choose one of: {', '.join(names)}")
    return _ATTACKS[name]


@dataclass
class DatasetSpec:
    label: str
    name: str
    n_train: int | None
    n_val: int | None
    n_test: int | None
    image_size: int | None
    root: str | None
    download: bool
    surrogate_reserve: int | None = None

    def fingerprint(self) -> dict:
        fp = {k: getattr(self, k) for k in ("name", "n_train", "n_val", "n_test", "image_size")}
        if self.surrogate_reserve is not None:
            fp["surrogate_reserve"] = self.surrogate_reserve
        return fp


@dataclass
class MethodSpec:
    label: str
    method: str
    options: dict  # as given (after method_defaults), validated by create_method
    resolved: dict  # every option of the method


@dataclass
class AttackSpec:
    label: str
    attack: str
    preset: str
    options: dict  # overrides of the preset, coerced, without eps
    eps: list[float]
    per_sample: bool = False  # crafted for each evaluated image on the original encoder


@dataclass
class BenchConfig:
    name: str
    device: str
    encoders: list[tuple[str, str]]  # (label, spec)
    datasets: list[DatasetSpec]
    surrogate: dict
    head: str
    methods: list[MethodSpec]
    attacks: list[AttackSpec]
    seeds: list[int]
    train: dict
    eval: dict
    whitebox: dict | None
    fresh_head: dict | None
    selfattack: list[str]
    raw: dict
    budget_controls: list[str] | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "device": self.device,
            "encoders": dict(self.encoders),
            "datasets": [d.__dict__ for d in self.datasets],
            "surrogate": self.surrogate,
            "head": self.head,
            "methods": {m.label: {"method": m.method, **m.options} for m in self.methods},
            "attacks": {
                a.label: {"attack": a.attack, "preset": a.preset, "eps": a.eps, **a.options} for a in self.attacks
            },
            "seeds": self.seeds,
            "train": self.train,
            "eval": self.eval,
            "whitebox": self.whitebox,
            "fresh_head": self.fresh_head,
            "selfattack": self.selfattack,
            "budget_controls": self.budget_controls,
        }


def load_config(config: str | os.PathLike | dict) -> BenchConfig:
    """Read and validate a bench configuration (a YAML path or a dict) without running anything.

    Every name is resolved: encoder spec syntax (no weights are loaded), datasets, methods and
    their options (``create_method`` validates them), attacks and their options for the preset.
    """
    from .methods.base import create_method, method_names
    from .train import TrainConfig

    if isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        from .config import load_yaml

        raw = load_yaml(config, "bench config")
    _check_keys(raw, TOP_KEYS, "the bench config")
    for req in ("methods", "attacks"):
        if req not in raw:
            raise _fail(f"the bench config needs '{req}'")

    device = str(raw.get("device") or "auto")
    # encoders
    enc_raw = raw.get("encoders", ["demo"])
    if isinstance(enc_raw, str):
        enc_raw = [enc_raw]
    if isinstance(enc_raw, dict):
        encoders = [(str(k), v) for k, v in enc_raw.items()]
    elif isinstance(enc_raw, list):
        encoders = [(_encoder_label(s) if isinstance(s, str) else "?", s) for s in enc_raw]
    else:
        raise _fail(f"encoders must be a list of specs or a mapping label -> spec, got {enc_raw!r}")
    if not encoders:
        raise _fail("encoders is empty")
    for lab, spec in encoders:
        check_encoder_spec(spec, f"encoders ({lab})")
        if lab != _label(lab):
            raise _fail(f"encoders: label '{lab}' may hold only letters, digits, '.', '_' and '-'")
    labels = [lab for lab, _ in encoders]
    if len(set(labels)) != len(labels):
        raise _fail(f"encoders: two specs get the same label ({labels}); give them labels: {{label: spec}}")

    # data and datasets
    data = _mapping(raw.get("data"), "data")
    _check_keys(data, DATA_KEYS, "data")
    ds_raw = raw.get("datasets", ["fashion-mnist"])
    if isinstance(ds_raw, str):
        ds_raw = [ds_raw]
    if not isinstance(ds_raw, list) or not ds_raw:
        raise _fail(f"datasets must be a non-empty list, got {ds_raw!r}")
    datasets = []
    for i, d in enumerate(ds_raw):
        where = f"datasets[{i}]"
        e = {"name": d} if isinstance(d, str) else _mapping(d, where)
        _check_keys(e, DATASET_KEYS, where)
        name = _check_dataset_name(e.get("name"), where)
        default_label = _label(name.split(":", 1)[1].rstrip("/").split("/")[-1]) if ":" in name else name
        spec = DatasetSpec(
            label=str(e.get("label") or default_label),
            name=name,
            **{k: _opt_int(e.get(k), f"{where}.{k}") for k in ("n_train", "n_val", "n_test")},
            image_size=_opt_int(e.get("image_size", data.get("image_size")), f"{where}.image_size"),
            root=e.get("root", data.get("root")),
            download=bool(e.get("download", data.get("download", False))),
            surrogate_reserve=_opt_int(
                e.get("surrogate_reserve", data.get("surrogate_reserve")), f"{where}.surrogate_reserve"
            ),
        )
        if spec.label != _label(spec.label):
            raise _fail(f"{where}: label '{spec.label}' may hold only letters, digits, '.', '_' and '-'")
        datasets.append(spec)
    dlabels = [d.label for d in datasets]
    if len(set(dlabels)) != len(dlabels):
        raise _fail(f"datasets: two entries share the label of {dlabels}; give each a distinct 'label'")

    # surrogate
    sur = _mapping(raw.get("surrogate"), "surrogate")
    _check_keys(sur, SURROGATE_KEYS, "surrogate")
    sname = _check_dataset_name(sur.get("dataset", datasets[0].name), "surrogate.dataset")
    resize = sur.get("resize", "none")
    if resize not in ("none", "bilinear"):
        raise _fail(f"surrogate.resize must be none or bilinear, got {resize!r}")
    n_sur = _opt_int(sur.get("n", 2000), "surrogate.n")
    surrogate = {
        "dataset": sname,
        "n": n_sur,
        "reserve": _opt_int(sur.get("reserve", data.get("surrogate_reserve")), "surrogate.reserve"),
        "image_size": _opt_int(sur.get("image_size", data.get("image_size")), "surrogate.image_size"),
        "root": sur.get("root", data.get("root")),
        "download": bool(sur.get("download", data.get("download", False))),
        "resize": resize,
    }
    default_sur_label = _label(sname.split(":", 1)[1].rstrip("/").split("/")[-1]) if ":" in sname else sname
    surrogate["label"] = _label(str(sur.get("label") or f"{default_sur_label}-n{n_sur}"))

    head = str(raw.get("head", "mlp"))
    if head not in ("mlp", "linear"):
        raise _fail(f"head must be mlp or linear, got {head!r}")

    # methods
    known_methods = method_names()
    mdef = _mapping(raw.get("method_defaults"), "method_defaults")
    methods = []
    for lab, opts in _named_entries(raw["methods"], "methods"):
        opts = dict(opts)
        mname = str(opts.pop("method", lab))
        if mname not in known_methods:
            raise _fail(
                f"methods.{lab}: unknown method '{mname}'{did_you_mean(mname, known_methods)}; "
                f"choose one of: {', '.join(known_methods)} (or name it with a 'method' key)"
            )
        merged = _apply_defaults(mname, mdef, opts)
        meth = _validated_method(create_method, mname, merged, f"methods.{lab}")
        methods.append(MethodSpec(lab, mname, {k: meth.cfg[k] for k in merged}, dict(meth.cfg)))
    if mdef:
        used = {k for k in mdef if any(k in m.resolved for m in methods)}
        unused = [k for k in mdef if k not in used]
        if unused:
            raise _fail(f"method_defaults: no method in this config has the option(s) {unused}")

    # attacks
    preset0 = str(raw.get("attack_preset", "cpu"))
    grid_raw = raw.get("eps", "preset")
    grid = None if grid_raw == "preset" else _eps_list(grid_raw, "eps")
    attacks = []
    for lab, opts in _named_entries(raw["attacks"], "attacks"):
        opts = dict(opts)
        aname = str(opts.pop("attack", lab))
        cls = _attack_class(aname)
        per_sample = not hasattr(cls, "fit")
        preset = str(opts.pop("preset", preset0))
        presets = getattr(cls, "presets", {})
        if preset not in presets:
            raise _fail(
                f"attacks.{lab}: attack {aname} has no preset '{preset}'{did_you_mean(preset, presets)}; "
                f"presets: {', '.join(presets)}"
            )
        params = presets[preset]
        extra = tuple(getattr(cls, "extra_keys", ()))
        eps_opt = opts.pop("eps", None)
        bad = [k for k in opts if k not in params and k not in extra]
        if bad:
            hints = "".join(did_you_mean(b, list(params)) for b in bad)
            raise _fail(
                f"attacks.{lab}: attack {aname} has no option(s) {bad}{hints}; its options: {', '.join(params)}"
            )
        coerced = {k: (_coerce_like(v, params[k], f"attacks.{lab}.{k}") if k in params else v) for k, v in opts.items()}
        if eps_opt is not None:
            eps = _eps_list(eps_opt, f"attacks.{lab}.eps")
        elif grid is not None:
            eps = list(grid)
        else:
            eps = [_eps_value(params["eps"], f"attacks.{lab} (preset eps)")]
        attacks.append(AttackSpec(lab, aname, preset, coerced, eps, per_sample))

    # seeds
    seeds_raw = raw.get("seeds", [0])
    seeds_raw = seeds_raw if isinstance(seeds_raw, list) else [seeds_raw]
    seeds = []
    for s in seeds_raw:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise _fail(f"seeds must be non-negative whole numbers, got {s!r}")
        if s not in seeds:
            seeds.append(s)
    if not seeds:
        raise _fail("seeds is empty")

    # training and evaluation
    train = _mapping(raw.get("train"), "train")
    tfields = [k for k in TrainConfig.__dataclass_fields__ if k != "seed"]
    _check_keys(train, tfields, "train")
    defaults = TrainConfig()
    train = {k: _coerce_like(v, getattr(defaults, k), f"train.{k}") for k, v in train.items()}
    if "device" in train and "device" in raw:
        raise _fail("give the device once: either device or train.device")
    device = str(train.pop("device", device))
    try:
        TrainConfig(**train).validate()
    except TypeError as exc:
        raise _fail(f"train: {exc}") from exc
    ev = _mapping(raw.get("eval"), "eval")
    _check_keys(ev, EVAL_KEYS, "eval")
    ev = {"batch_size": _opt_int(ev.get("batch_size", 512), "eval.batch_size")}
    wb_raw = raw.get("whitebox", True)
    if wb_raw is True:
        whitebox = {}
    elif wb_raw is False or wb_raw is None:
        whitebox = None
    else:
        whitebox = _mapping(wb_raw, "whitebox")
        _check_keys(whitebox, WHITEBOX_KEYS, "whitebox")
        for k in ("eps", "step"):
            if k in whitebox:
                whitebox[k] = _eps_value(whitebox[k], f"whitebox.{k}")
    fh_raw = raw.get("fresh_head", False)
    if fh_raw is False or fh_raw is None:
        fresh_head = None
    else:
        fh = {} if fh_raw is True else _mapping(fh_raw, "fresh_head")
        fh = _apply_defaults("lp", mdef, fh)
        lp = _validated_method(create_method, "lp", fh, "fresh_head")
        fresh_head = {k: lp.cfg[k] for k in fh}
    sa_raw = raw.get("selfattack", False)
    alabels = [a.label for a in attacks]
    if sa_raw is True:
        selfattack = list(alabels)
    elif sa_raw is False or sa_raw is None:
        selfattack = []
    elif isinstance(sa_raw, list):
        selfattack = []
        for lab in sa_raw:
            if lab not in alabels:
                raise _fail(f"selfattack: '{lab}' is not an attack of this config{did_you_mean(str(lab), alabels)}")
            selfattack.append(lab)
    else:
        raise _fail(f"selfattack must be true, false or a list of attack labels, got {sa_raw!r}")
    per = [a.label for a in attacks if a.per_sample and a.label in selfattack]
    if per and sa_raw is not True:
        raise _fail(f"selfattack: {per} are per-sample attacks; a self-attack crafts a universal DAE")
    selfattack = [lab for lab in selfattack if lab not in per]
    controls = _budget_controls(raw.get("budget_controls", True), methods, create_method)
    methods += controls
    return BenchConfig(
        name=str(raw.get("name") or "genaf bench"),
        device=device,
        encoders=encoders,
        datasets=datasets,
        surrogate=surrogate,
        head=head,
        methods=methods,
        attacks=attacks,
        seeds=seeds,
        train=train,
        eval=ev,
        whitebox=whitebox,
        fresh_head=fresh_head,
        selfattack=selfattack,
        raw=raw,
        budget_controls=[m.label for m in controls],
    )


def genaf_total_epochs(cfg: dict) -> int:
    """Every epoch a Gen-AF run trains: head warm-up + stage 1 + stage 2."""
    return int(cfg["warmup_epochs"]) + int(cfg["epochs"]) + (int(cfg["stage2_epochs"]) if cfg.get("stage2") else 0)


def _budget_controls(value: Any, methods: list, create_method) -> list:
    """SFT and AT again at Gen-AF's total training budget (epochs), so that a gain that is only
    more training shows. ``budget_controls``: true (default), false, or a list of method labels
    (of sft/at methods) to control."""
    if value is False or value is None:
        return []
    g = next((m for m in methods if m.label == "genaf"), None) or next(
        (m for m in methods if m.method == "genaf"), None
    )
    if g is None:
        return []
    total = genaf_total_epochs(g.resolved)
    labels = {m.label for m in methods}
    if isinstance(value, list):
        unknown = [v for v in value if v not in labels]
        if unknown:
            raise _fail(f"budget_controls: {unknown} are not method labels of this config")
        bases = [m for m in methods if m.label in value]
    elif value is True:
        bases = [m for m in methods if m.method in ("sft", "at") and m.label == m.method]
    else:
        raise _fail(f"budget_controls must be true, false or a list of method labels, got {value!r}")
    out = []
    for m in bases:
        if m.method not in ("sft", "at"):
            raise _fail(f"budget_controls: {m.label} is a {m.method} run; only sft and at runs have a budget control")
        warm = int(m.resolved.get("warmup_epochs", 0)) if m.method == "at" else 0
        epochs = total - warm
        if epochs == int(m.resolved["epochs"]) or epochs < 1:
            continue  # already at that budget
        label = f"{m.label}-budget"
        if label in labels:
            continue  # the config names its own
        opts = {**m.options, "epochs": epochs}
        meth = _validated_method(create_method, m.method, opts, f"budget_controls.{label}")
        out.append(MethodSpec(label, m.method, {k: meth.cfg[k] for k in opts}, dict(meth.cfg)))
    return out


def _opt_int(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _fail(f"{where} must be a positive whole number, got {v!r}")
    return v


def _apply_defaults(method: str, mdef: dict, opts: dict) -> dict:
    from .methods.base import _METHODS, method_names

    method_names()
    known = _METHODS[method].default_config()
    return {**{k: v for k, v in mdef.items() if k in known}, **opts}


def _validated_method(create_method, name: str, opts: dict, where: str):
    try:
        return create_method(name, **opts)
    except GenafError as exc:
        raise _fail(f"{where}: {exc}") from exc


# ---------------------------------------------------------------------------- helpers
def _expand(text: str | None) -> str | None:
    """``$VAR`` / ``${VAR}`` and ``~`` in paths and specs, expanded when they are used (the
    configuration and the fingerprints keep them as written)."""
    if not text:
        return text
    scheme, sep, rest = text.partition(":")
    if sep and scheme.isalpha() and len(scheme) > 1:
        return f"{scheme}:{_expand(rest)}"
    return os.path.expanduser(os.path.expandvars(text))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _eps_tag(eps: float) -> str:
    return f"{eps:.5f}".rstrip("0").rstrip(".")


def _row_key(r: dict) -> str:
    return "|".join(str(r[k]) if k != "eps" else repr(float(r[k])) for k in KEY_COLUMNS)


def _checks_text(m: dict) -> str:
    checks = m.get("checks")
    if not checks:
        return ""
    failed = checks.get("failed", [])
    return "FAILED: " + ", ".join(failed) if failed else "ok"


def _write_csv(path: Path, rows: list[dict]) -> None:
    def w(tmp: str) -> None:
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        wr.writeheader()
        for r in rows:
            wr.writerow(
                {k: ("" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k])) for k in COLUMNS}
            )
        Path(tmp).write_text(buf.getvalue())

    atomic_write(path, w)


def read_results(out_dir: str | os.PathLike) -> dict:
    """``results.json`` of a bench folder: ``{"name", "order", "rows"}`` (a bare row list is accepted)."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        if list((Path(out_dir) / "shards").glob("*-of-*.json")):
            raise ConfigError(f"{path} does not exist yet: {out_dir} holds shard results; merge them with genaf report")
        raise ConfigError(f"{path} does not exist: run genaf bench first")
    return read_results_file(path)


def read_results_file(path: Path) -> dict:
    """A results file (``results.json`` or a shard's ``shards/I-of-N.json``), checked row by row."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
    if isinstance(obj, list):
        obj = {"rows": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        raise ConfigError(f"{path} holds no 'rows' list")
    for i, r in enumerate(obj["rows"]):
        _check_row(r, f"{path} row {i}")
    return obj


def _check_row(r: Any, where: str) -> None:
    """A results row as genaf writes it: key columns present, numbers where numbers belong."""
    if not isinstance(r, dict):
        raise ConfigError(f"{where} is not a mapping ({type(r).__name__}); was the file edited by hand?")
    missing = [k for k in KEY_COLUMNS if k not in r]
    if missing:
        raise ConfigError(f"{where} lacks the column(s) {missing}; was the file edited by hand?")
    for k in ("encoder", "dataset", "method", "setting", "attack"):
        if not isinstance(r[k], str):
            raise ConfigError(f"{where}: {k} must be text, got {r[k]!r}")
    if isinstance(r["seed"], bool) or not isinstance(r["seed"], int):
        raise ConfigError(f"{where}: seed must be a whole number, got {r['seed']!r}")
    for k in ("eps", "clean_acc", "robust_acc", "val_clean_acc", "val_robust_acc", "fooling_rate", "drift"):
        v = r.get(k)
        if v is None and k not in ("eps", "clean_acc", "robust_acc"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ConfigError(f"{where}: {k} must be a number, got {v!r}; was the file edited by hand?")
        if k.endswith("_acc") and not 0.0 <= v <= 1.0:
            raise ConfigError(f"{where}: {k}={v} is not an accuracy in [0, 1]")


@contextlib.contextmanager
def _lock(out: Path, shard: tuple[int, int] | None = None):
    """An unsharded run (or a merge) holds ``OUT/.bench.lock`` exclusively; a shard holds it
    shared and ``OUT/.bench-shard-I-of-N.lock`` exclusively, so shards run side by side but never
    beside an unsharded run, a merge, or another copy of the same shard."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    handles = []
    try:
        fh = open(out / ".bench.lock", "w")
        handles.append(fh)
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shard else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            what = "an unsharded genaf bench or a merge" if shard else "another genaf bench (or a shard of one)"
            raise ConfigError(f"{what} is writing into {out}; wait for it or choose another --out") from exc
        if shard:
            sh = open(out / f".bench-shard-{_shard_tag(shard)}.lock", "w")
            handles.append(sh)
            try:
                fcntl.flock(sh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ConfigError(
                    f"shard {shard[0]}/{shard[1]} is already running in {out}; each shard index runs once"
                ) from exc
        yield
    finally:
        for fh in reversed(handles):
            fh.close()


@contextlib.contextmanager
def _file_lock(path: Path, wait: bool = True):
    """A lock beside ``path`` while it is made, so that shards sharing an input (a perturbation,
    per-sample DAE images) make it once: the others wait, then read the file. Yields whether this
    process holds it: with ``wait=False`` it does not block, and yields False when another process
    holds it (the caller then makes something else first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield True
        return
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _shard_tag(shard: tuple[int, int]) -> str:
    return f"{shard[0]}-of-{shard[1]}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``'I/N'`` (I in 0..N-1, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) -> ``(I, N)``."""
    if text is None:
        return None
    i, sep, n = str(text).partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = None
    if not sep or shard is None or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got '{text}'")
    return shard


# ---------------------------------------------------------------------------- the encoder lock
LOCK_FILE = "encoders.lock.json"
LOCK_FORMAT = "genaf-bench-encoder-lock"


def encoder_lock_entry(label: str, spec: str) -> dict:
    """The lock entry of encoder ``label``: ``{"spec", "files": [{"name", "path", "sha256",
    "size"}]}`` for every local file ``spec`` reads (``$VARS`` expanded), hashed now. Hashing
    streams the file and happens once per process per (path, size, modification time). A file
    read only when present is listed with ``sha256: null`` while absent; a missing required file
    is a :class:`~genaf.errors.CheckpointError`. A spec that reads no local file gets a ``note``."""
    from .encoders import _reads_hub, file_sha256, spec_files

    expanded = _expand(spec)
    files = []
    for path, required in spec_files(expanded):
        if path.is_file():
            size = path.stat().st_size
            files.append({"name": path.name, "path": str(path), "sha256": file_sha256(path), "size": size})
        elif required:
            raise CheckpointError(
                f"encoder {label} ({spec}): file {path} does not exist; fix the path in the bench config"
            )
        else:
            files.append({"name": path.name, "path": str(path), "sha256": None, "size": None})
    entry: dict = {"spec": spec, "files": files}
    if _reads_hub(expanded):
        entry["note"] = "weights from the library's hub cache are not locked; write a local PATH in the spec"
    elif not files:
        entry["note"] = "random weights: no file is read"
    elif any(f["sha256"] is None for f in files):
        entry["note"] = "a file with sha256 null is absent; it is read only when present"
    return entry


def _read_lock(path: Path) -> dict:
    fix = "restore it, or delete it to lock the files as they are now"
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable encoder lock ({exc}); {fix}") from exc
    if not isinstance(obj, dict) or obj.get("format") != LOCK_FORMAT or not isinstance(obj.get("encoders"), dict):
        raise ConfigError(f"{path} is not a genaf encoder lock (format {LOCK_FORMAT}); {fix}")
    return obj


def _lock_differences(old: dict, new: dict) -> list[tuple[str, str | None, str | None]]:
    """``[(path, locked sha256, sha256 now)]`` of the files whose bytes differ (matched by file
    name, so that a folder mounted elsewhere with the same bytes is the same encoder)."""
    before = {f.get("name"): f for f in old.get("files") or []}
    now = {f["name"]: f for f in new["files"]}
    out = []
    for name in [*before, *(n for n in now if n not in before)]:
        a, b = (before.get(name) or {}).get("sha256"), (now.get(name) or {}).get("sha256")
        if a != b:
            out.append(((now.get(name) or before.get(name) or {}).get("path"), a, b))
    return out


def check_encoder_lock(cfg: BenchConfig, out: Path, update: bool = False, log=print) -> tuple[dict, dict]:
    """Hash the files of every encoder of ``cfg`` and compare them with ``OUT/encoders.lock.json``
    (written on the first run). A difference is a :class:`~genaf.errors.CheckpointError` unless
    ``update``, which rewrites the lock. Returns ``(entries now, entries replaced)`` by label.
    The lock is read, compared and written under an exclusive file lock, so that shards starting
    at once create it once and see one another's file."""
    entries = {lab: encoder_lock_entry(lab, spec) for lab, spec in cfg.encoders}  # hashed outside the lock
    path = out / LOCK_FILE
    with _file_lock(path):
        old = _read_lock(path) if path.is_file() else None
        locked = dict(old["encoders"]) if old else {}
        replaced, history = {}, list(old.get("replaced") or []) if old else []
        for lab, entry in entries.items():
            prev = locked.get(lab)
            if prev is None:
                locked[lab] = entry
                continue
            if prev.get("spec") != entry["spec"]:  # an edited configuration: another encoder under this label
                log(f"bench: encoder {lab} is now {entry['spec']} (was {prev.get('spec')}): its lock entry is replaced")
                locked[lab] = entry
                continue
            diffs = _lock_differences(prev, entry)
            if not diffs:  # the same bytes (perhaps under another mount point): the lock stays as it is
                continue
            file, a, b = diffs[0]
            more = f" (and {len(diffs) - 1} more file(s))" if len(diffs) > 1 else ""
            if not update:
                raise CheckpointError(
                    f"encoder {lab}: file {file} differs from {path}{more}: locked sha256 {a or 'absent'}, "
                    f"now {b or 'absent'}; restore the file, or accept the new one with --update-lock "
                    "(its runs and perturbations are then made again)"
                )
            for file, a, b in diffs:
                history.append({"encoder": lab, "path": file, "sha256": a, "replaced_by": b})
            replaced[lab] = prev
            locked[lab] = entry
        if old is None or locked != old["encoders"] or replaced:
            obj = {"format": LOCK_FORMAT, "version": 1, "encoders": locked}
            if history:
                obj["replaced"] = history
            write_json(path, obj)
            n = sum(len(e["files"]) for e in locked.values())
            log(f"bench: the sha256 of {n} encoder file(s) {'written to' if old is None else 'updated in'} {path}")
    return {lab: locked[lab] for lab, _ in cfg.encoders}, replaced


def _log_invalidated(cfg: BenchConfig, out: Path, locked: dict, replaced: dict, log) -> None:
    """After ``--update-lock``: what the new files invalidate (the cached results whose keys hold
    the old files' hashes)."""
    old = Bench(cfg, out, log=lambda *_: None, locked={**locked, **replaced})
    rows = []
    if (out / "results.json").is_file():
        rows += read_results(out)["rows"]
    for f in old.shard_files():
        rows += read_results_file(f)["rows"]
    for lab, prev in replaced.items():
        changed = ", ".join(
            f"{file} sha256 {a or 'absent'} -> {b or 'absent'}" for file, a, b in _lock_differences(prev, locked[lab])
        )
        units = [(s, d, m) for s, e, d, m in old.units() if e == lab]
        runs = [old.run_dir(lab, d, m, s) for s, d, m in units]
        perts = [old.pert_path(lab, a, e, s) for a in cfg.attacks if not a.per_sample for e in a.eps for s in cfg.seeds]
        per = [
            old.per_sample_stem(lab, d, a, e, s)
            for d in cfg.datasets
            for a in cfg.attacks
            if a.per_sample
            for e in a.eps
            for s in cfg.seeds
        ]
        n_runs = sum(r.is_dir() for r in runs)
        selfdirs = [old.self_pert_dir(lab, d, m, s) for s, d, m in units]
        n_perts = sum(p.is_file() for p in perts) + sum(len(list(f.rglob("*.safetensors"))) for f in selfdirs)
        n_per = sum(p.with_name(f"{p.name}-{split}.safetensors").is_file() for p in per for split in ("test", "val"))
        n_rows = sum(1 for r in rows if r.get("encoder") == lab)
        log(
            f"bench: --update-lock: encoder {lab}: {changed}. The cache keys of its results hold the files' sha256, "
            f"so what the old file made is not reused: {n_rows} result row(s), {n_runs} fine-tune run(s), "
            f"{n_perts} perturbation(s) and {n_per} per-sample DAE file(s) of {lab} are made again "
            "(the old files stay in the output folder until you delete them)"
        )


# ---------------------------------------------------------------------------- the runner
class Bench:
    def __init__(
        self, cfg: BenchConfig, out: Path, log=print, shard: tuple[int, int] | None = None, locked: dict | None = None
    ) -> None:
        from .utils import resolve_device

        self.cfg, self.out, self.log, self.shard = cfg, out, log, shard
        # other processes write into OUT beside this one (shards, Ray tasks): shared inputs are
        # made under a per-file lock
        self.shared = shard is not None
        self.where = f" (shard {shard[0]}/{shard[1]})" if shard else ""  # in the progress lines
        self.locked = locked  # label -> encoder lock entry (check_encoder_lock); None: read OUT's lock
        self._enc_sha: dict[str, list] = {}
        self.dev = resolve_device(cfg.device)
        self.rows: dict[str, dict] = {}
        self._data: dict = {}
        self._surrogates: dict = {}
        self._encoders: dict = {}
        self._perts: dict = {}
        self.computed = 0
        self.index = self._order_index()

    # -- canonical order ------------------------------------------------------
    def _order_index(self) -> dict:
        c = self.cfg
        return {
            "encoder": {lab: i for i, (lab, _) in enumerate(c.encoders)},
            "dataset": {d.label: i for i, d in enumerate(c.datasets)},
            "method": {m.label: i for i, m in enumerate(c.methods)},
            "setting": {s: i for i, s in enumerate(SETTINGS)},
            "attack": {a.label: i for i, a in enumerate(c.attacks)},
            "seed": {s: i for i, s in enumerate(c.seeds)},
        }

    def _sort_key(self, r: dict):
        ix = self.index
        big = 1 << 20
        return (
            ix["encoder"].get(r["encoder"], big),
            ix["dataset"].get(r["dataset"], big),
            ix["method"].get(r["method"], big),
            ix["setting"].get(r["setting"], big),
            ix["attack"].get(r["attack"], big),
            r["attack"],
            float(r["eps"]),
            ix["seed"].get(r["seed"], big),
        )

    # -- results --------------------------------------------------------------
    def load_rows(self, wanted: dict[str, str]) -> None:
        path = self.out / "results.json"
        old = read_results(self.out)["rows"] if path.is_file() else []
        for f in self.shard_files():
            old += read_results_file(f)["rows"]
        if not old:
            return
        kept = dropped = 0
        for r in old:
            k = _row_key(r)
            if self.shard and k not in wanted:  # another shard's cell
                continue
            if wanted.get(k) == r.get("fingerprint"):
                self.rows[k] = r
                kept += 1
            else:
                dropped += 1
        self.log(
            f"bench: {kept} finished cell(s) found in {path}" + (f"; {dropped} stale row(s) dropped" if dropped else "")
        )

    def sorted_rows(self) -> list[dict]:
        return sorted(self.rows.values(), key=self._sort_key)

    def shard_files(self) -> list[Path]:
        return sorted((self.out / "shards").glob("*-of-*.json"))

    def save(self) -> None:
        rows = self.sorted_rows()
        if self.shard:
            mine = self.shard_cells()
            rows = [r for r in rows if _row_key(r) in mine]
        path = self.out / "shards" / f"{_shard_tag(self.shard)}.json" if self.shard else self.out / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            path,
            {
                "format": RESULTS_FORMAT,
                "version": 1,
                "name": self.cfg.name,
                "order": {k: list(v) for k, v in self.index.items()},
                "columns": list(COLUMNS),
                "rows": rows,
            },
        )
        if not self.shard:
            _write_csv(self.out / "results.csv", rows)

    def record(self, rows: list[dict]) -> None:
        for r in rows:
            self.rows[_row_key(r)] = r
        self.computed += len(rows)
        self.save()

    # -- data ------------------------------------------------------------------
    def data(self, ds: DatasetSpec, seed: int):
        from .data import load_dataset

        key = (ds.label, seed)
        if key not in self._data:
            if len(self._data) >= 4:
                self._data.clear()
            self._data[key] = load_dataset(
                _expand(ds.name),
                root=_expand(ds.root),
                image_size=ds.image_size,
                n_train=ds.n_train,
                n_val=ds.n_val,
                n_test=ds.n_test,
                seed=seed,
                download=ds.download,
                surrogate_reserve=ds.surrogate_reserve,
            )
        return self._data[key]

    def surrogate(self, seed: int):
        """The attacker's images for ``seed``: the first ``n`` of the surrogate dataset's reserve,
        which no downstream train/val split of that dataset uses for any seed (genaf.data)."""
        from .data import load_dataset

        if seed in self._surrogates:
            return self._surrogates[seed]
        s = self.cfg.surrogate
        for d in self.cfg.datasets:
            if d.name == s["dataset"] and d.surrogate_reserve != s["reserve"]:
                raise ConfigError(
                    f"datasets entry {d.label} keeps a surrogate reserve of {d.surrogate_reserve} but the surrogate "
                    f"draws from a reserve of {s['reserve']}; give both the same surrogate_reserve "
                    "(data.surrogate_reserve)"
                )
        dm = load_dataset(
            _expand(s["dataset"]),
            root=_expand(s["root"]),
            image_size=s["image_size"],
            seed=seed,
            download=s["download"],
            surrogate_reserve=s["reserve"],
        )
        images = dm.surrogate(s["n"])
        name = f"{s['dataset']} surrogate reserve ({len(images)} images)"
        self._surrogates = {seed: (images, name)}
        return self._surrogates[seed]

    def encoder(self, label: str):
        from .encoders import load_encoder

        if label not in self._encoders:
            spec = dict(self.cfg.encoders)[label]
            self._encoders = {label: load_encoder(_expand(spec))}
        return self._encoders[label]

    # -- fingerprints ---------------------------------------------------------
    def enc_sha(self, enc: str) -> list:
        """The sha256 of every file encoder ``enc`` reads (its lock entry; ``[]`` for random
        weights): part of every cache key made from the encoder, so that a file accepted with
        ``--update-lock`` never reuses what the old file made."""
        if enc not in self._enc_sha:
            spec = dict(self.cfg.encoders)[enc]
            entry = (self.locked or {}).get(enc)
            path = self.out / LOCK_FILE
            if entry is None and path.is_file():  # a merge or a report: the lock the runs checked
                entry = _read_lock(path)["encoders"].get(enc)
            if entry is None or entry.get("spec") != spec:
                entry = encoder_lock_entry(enc, spec)
            self._enc_sha[enc] = [f.get("sha256") for f in entry.get("files") or []]
        return self._enc_sha[enc]

    def run_fp(self, enc: str, ds: DatasetSpec, m: MethodSpec, seed: int) -> str:
        c = self.cfg
        key = {
            "encoder": dict(c.encoders)[enc],
            "dataset": ds.fingerprint(),
            "method": m.method,
            "options": m.resolved,
            "head": c.head,
            "train": c.train,
            "eval": c.eval,
            "whitebox": c.whitebox,
            "seed": seed,
        }
        if self.enc_sha(enc):
            key["encoder_files"] = self.enc_sha(enc)
        return _hash(key)

    def pert_fp(self, enc_spec: str, a: AttackSpec, eps: float, seed: int, enc_files: list | None = None) -> str:
        """``enc_files``: the sha256 of the encoder's files (:meth:`enc_sha`)."""
        s = {k: v for k, v in self.cfg.surrogate.items() if k not in ("root", "download", "label")}
        reserve = [d.fingerprint() for d in self.cfg.datasets if d.name == s["dataset"]]
        return _hash(
            {
                **({"encoder_files": enc_files} if enc_files else {}),
                "encoder": enc_spec,
                "attack": a.attack,
                "preset": a.preset,
                "options": a.options,
                # the preset's values as the code has them now: a changed preset re-crafts
                "resolved": {
                    k: v
                    for k, v in {**_attack_class(a.attack).presets.get(a.preset, {}), **a.options}.items()
                    if k != "eps"
                },
                "eps": eps,
                "seed": seed,
                "surrogate": s,
                "splits": reserve,
            }
        )

    def run_dir(self, enc: str, ds: DatasetSpec, m: MethodSpec, seed: int) -> Path:
        return self.out / "runs" / enc / ds.label / m.label / f"seed{seed}-{self.run_fp(enc, ds, m, seed)}"

    def pert_path(self, enc: str, a: AttackSpec, eps: float, seed: int) -> Path:
        spec = dict(self.cfg.encoders)[enc]
        fp = self.pert_fp(spec, a, eps, seed, self.enc_sha(enc))
        sur = self.cfg.surrogate["label"]
        return self.out / "perturbations" / enc / sur / a.label / f"eps{_eps_tag(eps)}-seed{seed}-{fp}.safetensors"

    def self_pert_dir(self, enc: str, ds: DatasetSpec, m: MethodSpec, seed: int) -> Path:
        """The folder of the self-attack perturbations crafted on one fine-tuned model."""
        run_fp = self.run_fp(enc, ds, m, seed)
        return self.out / "perturbations" / "self" / enc / ds.label / m.label / f"seed{seed}-{run_fp}"

    def per_sample_stem(self, enc: str, ds: DatasetSpec, a: AttackSpec, eps: float, seed: int) -> Path:
        """``OUT/per-sample/ENC/DATASET/ATTACK/epsE-seedS-FP``: the cached per-sample DAE images are
        ``STEM-test.safetensors`` and ``STEM-val.safetensors``."""
        fp = _hash(
            {
                **({"encoder_files": self.enc_sha(enc)} if self.enc_sha(enc) else {}),
                "encoder": dict(self.cfg.encoders)[enc],
                "dataset": ds.fingerprint(),
                "attack": a.attack,
                "preset": a.preset,
                "options": a.options,
                "eps": eps,
                "seed": seed,
            }
        )
        return self.out / "per-sample" / enc / ds.label / a.label / f"eps{_eps_tag(eps)}-seed{seed}-{fp}"

    def wb_names(self) -> list[tuple[str, float]]:
        from .config import DEFAULTS
        from .evaluation import whitebox_attacks

        if self.cfg.whitebox is None:
            return []
        wb = {**DEFAULTS["eval"]["whitebox"], **self.cfg.whitebox}
        return [(n, float(d["eps"])) for n, (_, d) in whitebox_attacks(wb).items()]

    # -- the cells of one unit (encoder, dataset, method, seed) ----------------
    def unit_cells(self, enc: str, ds: DatasetSpec, m: MethodSpec, seed: int) -> dict[str, dict]:
        run_fp = self.run_fp(enc, ds, m, seed)
        spec = dict(self.cfg.encoders)[enc]
        sha = self.enc_sha(enc)
        base = {"encoder": enc, "dataset": ds.label, "method": m.label, "seed": seed}
        cells = {}

        def add(setting, attack, eps, fp, extra=None):
            c = {**base, "setting": setting, "attack": attack, "eps": float(eps), "fingerprint": fp, **(extra or {})}
            cells[_row_key(c)] = c

        for a in self.cfg.attacks:
            for e in a.eps:
                pfp = self.pert_fp(spec, a, e, seed, sha)
                add("dae", a.label, e, _hash([run_fp, pfp]), {"spec": a})
        for name, e in self.wb_names():
            add("whitebox", name, e, _hash([run_fp, name]))
        if self.cfg.fresh_head is not None:
            for a in self.cfg.attacks:
                for e in a.eps:
                    pfp = self.pert_fp(spec, a, e, seed, sha)
                    add("fresh-head", a.label, e, _hash([run_fp, pfp, self.cfg.fresh_head]), {"spec": a})
        for a in self.cfg.attacks:
            if a.label in self.cfg.selfattack:
                for e in a.eps:
                    pfp = self.pert_fp(f"self:{run_fp}", a, e, seed)
                    add("self-attack", a.label, e, _hash([run_fp, pfp, "self"]), {"spec": a})
        return cells

    def units(self, shard: tuple[int, int] | None = None) -> list[tuple]:
        """(seed, encoder, dataset, method) in the canonical order; with ``shard=(I, N)``, every
        N-th from the I-th (a deterministic share, disjoint from the other shards')."""
        c = self.cfg
        units = [(s, e, d, m) for s in c.seeds for e, _ in c.encoders for d in c.datasets for m in c.methods]
        return units if shard is None else units[shard[0] :: shard[1]]

    def all_cells(self) -> dict[str, str]:
        out = {}
        for seed, enc, ds, m in self.units():
            out.update({k: c["fingerprint"] for k, c in self.unit_cells(enc, ds, m, seed).items()})
        return out

    def shard_cells(self) -> set[str]:
        if not hasattr(self, "_shard_cells"):
            self._shard_cells = {
                k for seed, enc, ds, m in self.units(self.shard) for k in self.unit_cells(enc, ds, m, seed)
            }
        return self._shard_cells

    # -- perturbations --------------------------------------------------------
    def perturbation(self, encoder, path: Path, a: AttackSpec, eps: float, seed: int, wait: bool = True):
        """The universal perturbation at ``path``: cached, read, or crafted on ``encoder``. With
        ``wait=False`` (sharded runs) it returns None instead of waiting while another process
        crafts it."""
        from .api import craft
        from .attacks import Perturbation

        key = str(path)
        if key in self._perts:
            return self._perts[key]
        sur, sur_name = self.surrogate(seed)
        with _file_lock(path, wait) if self.shared else contextlib.nullcontext(True) as mine:
            if not mine:
                return None
            pert = self._load_or_craft(encoder, path, a, eps, seed, sur, sur_name, craft, Perturbation)
            if not path.with_suffix(".delta.png").is_file():
                _pictures(pert, sur, path)
        if self.cfg.surrogate["resize"] == "bilinear":
            pert.resize = "bilinear"
        if len(self._perts) >= 64:
            self._perts.clear()
        self._perts[key] = pert
        return pert

    def _load_or_craft(self, encoder, path: Path, a: AttackSpec, eps: float, seed: int, sur, sur_name, craft, cls):
        if path.is_file():  # made earlier, or by another shard while this one waited for the lock
            return cls.load(path)
        self.log(f"bench: crafting {a.label} (ε={eps:.4f}, seed {seed}) -> {path.relative_to(self.out)}")
        return craft(
            encoder,
            a.attack,
            sur,
            eps,
            preset=a.preset,
            seed=seed,
            surrogate_name=sur_name,
            device=str(self.dev),
            out=path,
            log=self.log,
            **a.options,
        )

    # -- one unit ---------------------------------------------------------------
    def finetune_run(
        self,
        run: Path,
        enc_spec: str,
        ds: DatasetSpec,
        method: str,
        mopts: dict,
        seed: int,
        whitebox,
        keep_last_epoch: bool = False,
        continue_from: Path | None = None,
    ):
        """Fine-tune into ``run`` (or resume it, or reuse it when finished); returns its metrics.
        ``keep_last_epoch``: keep the last epoch's state for a budget control to continue;
        ``continue_from``: a finished run of the same options with fewer epochs that kept it
        (``genaf.finetune(continue_from=...)``: the same result as training from scratch)."""
        from .api import finetune

        metrics_path = run / "metrics.json"
        if metrics_path.is_file() and (run / "model.safetensors").is_file():
            return json.loads(metrics_path.read_text())
        resume = (run / "checkpoint.pt").is_file()
        if not resume and run.is_dir() and not (run / "model.safetensors").is_file():
            self._clear_unstarted(run)
        if resume:
            continue_from = None
        doing = "resuming" if resume else "fine-tuning"
        if continue_from is not None:
            doing = f"continuing {continue_from.relative_to(self.out)} into"
        self.log(f"bench: {doing} {run.relative_to(self.out)}")
        return finetune(
            _expand(enc_spec),
            _expand(ds.name),
            method,
            run,
            config={"head": self.cfg.head, "eval": {"whitebox": whitebox, "batch_size": self.cfg.eval["batch_size"]}},
            method_config=mopts,
            train={
                **self.cfg.train,
                "device": str(self.dev),
                "progress": False,
                **({"keep_last_epoch": True} if keep_last_epoch else {}),
            },
            data={
                "root": _expand(ds.root),
                "image_size": ds.image_size,
                "n_train": ds.n_train,
                "n_val": ds.n_val,
                "n_test": ds.n_test,
                "download": ds.download,
                "surrogate_reserve": ds.surrogate_reserve,
            },
            seed=seed,
            resume=resume,
            datamodule=self.data(ds, seed),
            log=lambda *_a, **_k: None,
            continue_from=continue_from,
        )

    def continuation(self, enc: str, ds: DatasetSpec, m: MethodSpec, seed: int) -> tuple[bool, Path | None]:
        """For the run of ``m``: whether it keeps its last epoch (a budget control extends it), and
        the finished run a budget control continues (None: that run is not finished, or kept no
        last epoch, so the control trains from scratch, which computes the same)."""
        from .train import LAST_EPOCH

        controls = set(self.cfg.budget_controls or [])
        keep = f"{m.label}-budget" in controls
        if m.label not in controls:
            return keep, None
        base = next((b for b in self.cfg.methods if b.label == m.label.removesuffix("-budget")), None)
        if base is None:
            return keep, None
        src = self.run_dir(enc, ds, base, seed)
        if (src / LAST_EPOCH).is_file() and (src / "metrics.json").is_file():
            return keep, src
        return keep, None

    def _clear_unstarted(self, run: Path) -> None:
        """A fine-tune stopped before its first epoch checkpoint left ``config.yaml`` (and perhaps a
        log) but nothing to resume from: empty the folder, so that the fine-tune starts again. The
        run's own lock is taken first, so a fine-tune still running in it is never touched."""
        import shutil

        from .api import run_lock

        left = [p for p in run.iterdir() if p.name != ".genaf.lock"]
        if not left:
            return
        fh = run_lock(run)
        try:
            for p in left:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        finally:
            fh.close()
        self.log(f"bench: {run.relative_to(self.out)} was stopped before its first checkpoint: starting it again")

    def evaluate_cells(
        self, run: Path, cells: list[dict], perts: dict, dm, metrics, setting_run: str, adv=None, train_s=None
    ) -> list:
        """Rows of ``cells`` from one evaluation of ``run`` on the test split and one on the
        validation split (the numbers every decision of the report is made on)."""
        from .api import evaluate

        if not cells:
            return []
        adv = adv or {}
        t0 = time.time()
        m = evaluate(
            run,
            perts,
            datamodule=dm,
            device=str(self.dev),
            whitebox=False,
            adversarial={k: v["test"] for k, v in adv.items()},
        )
        v = evaluate(
            run,
            perts,
            datamodule=dm,
            device=str(self.dev),
            whitebox=False,
            split="val",
            adversarial={k: v["val"] for k, v in adv.items()},
        )["validation"]
        dt = round(time.time() - t0, 2)
        checks = _checks_text(m)
        rows = []
        for c in cells:
            pname = c["pname"]
            craft_s = perts[pname].config.get("seconds", 0.0) if pname in perts else adv[pname]["test"][1]["seconds"]
            rows.append(
                self._row(
                    c,
                    metrics,
                    clean_acc=m["clean_acc"],
                    robust_acc=m["robust_acc"][pname],
                    fooling_rate=m["fooling_rate"][pname],
                    val_clean_acc=v["clean_acc"],
                    val_robust_acc=v["robust_acc"][pname],
                    checks=checks,
                    train_seconds=metrics.get("train_seconds") if train_s is None else train_s,
                    craft_seconds=float(craft_s),
                    eval_seconds=dt,
                    run=setting_run,
                    perturbation=c.get("pfile", ""),
                )
            )
        return rows

    def per_sample_images(
        self, enc: str, ds: DatasetSpec, a: AttackSpec, eps: float, seed: int, dm, wait: bool = True
    ) -> dict | None:
        """Per-sample DAEs of ``a`` on the original encoder for the test and validation images of
        ``dm``: ``{"test": (images, desc), "val": (images, desc)}``, crafted once and cached in
        ``OUT/per-sample/`` (they do not depend on the fine-tuned model). With ``wait=False``
        (sharded runs) None while another process crafts them."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        from .api import craft_per_sample
        from .encoders.safe_load import check_safetensors

        stem = self.per_sample_stem(enc, ds, a, eps, seed)
        out = {}
        fn = desc = None
        lock = _file_lock(stem, wait) if self.shared else contextlib.nullcontext(True)
        with lock as mine:
            if not mine:
                return None
            for split, images in (("test", dm.test), ("val", dm.val)):
                path = stem.with_name(f"{stem.name}-{split}.safetensors")
                if path.is_file():
                    check_safetensors(path, "cached per-sample DAE images")
                    with safe_open(str(path), framework="pt") as fh:
                        x = fh.get_tensor("x_adv")
                        d = json.loads(fh.metadata()["desc"])
                    out[split] = (x, d)
                    continue
                if fn is None:
                    fn, desc = craft_per_sample(
                        self.encoder(enc), a.attack, preset=a.preset, seed=seed, device=self.dev, eps=eps, **a.options
                    )
                    self.log(f"bench: crafting per-sample {a.label} (ε={eps:.4f}, seed {seed}) on the original encoder")
                t0 = time.time()
                xs = [fn(x).cpu() for x, _, _ in images.batches(self.cfg.eval["batch_size"], device=self.dev)]
                x = torch.cat(xs).contiguous()
                d = {**desc, "seconds": round(time.time() - t0, 2), "images": len(x)}
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, x=x, d=d: save_file({"x_adv": x}, tmp, metadata={"desc": json.dumps(d)}))
                out[split] = (x, d)
        return out

    def _row(self, c: dict, metrics: dict, **vals) -> dict:
        a = c.get("spec")
        r = {k: c[k] for k in KEY_COLUMNS}
        budget = metrics.get("budget") or {}
        passes = (budget.get("encoder_passes_per_train_image") or {}).get("train") or {}
        r.update(
            drift=metrics.get("weight_drift"),
            total_epochs=budget.get("total_epochs"),
            passes_per_image=round(sum(passes.values()), 2) if passes else None,
        )
        r.update(vals)
        r["method_name"] = next(m.method for m in self.cfg.methods if m.label == c["method"])
        r["attack_name"] = a.attack if a is not None else c["attack"]
        r["fingerprint"] = c["fingerprint"]
        ca, ra = r["clean_acc"], r["robust_acc"]
        r["attack_success_rate"] = 1.0 - ra  # METHOD.md §7: named explicitly, 1 - RA
        r["relative_decline"] = (ca - ra) / ca if ca > 0 else 0.0
        return {k: r.get(k) for k in COLUMNS}

    def claim_inputs(self, enc: str, ds: DatasetSpec, cells: list[dict], seed: int, dm) -> list[str]:
        """Sharded runs: before waiting for any shared input of these DAE cells, make each one
        that is missing and that no other process is making now, starting at this shard's place in
        the list (shard I of N at its I/N-th item, then round). Shards that reach a seed together
        thus craft its perturbations side by side, where otherwise one crafts them all while the
        others wait on its locks. Returns the labels of the inputs this call made or read."""
        todo, seen = [], set()
        for c in cells:
            a: AttackSpec = c["spec"]
            key = (a.label, c["eps"])
            if key in seen:
                continue
            seen.add(key)
            if a.per_sample:
                stem = self.per_sample_stem(enc, ds, a, c["eps"], seed)
                if not all(stem.with_name(f"{stem.name}-{s}.safetensors").is_file() for s in ("test", "val")):
                    todo.append((a, c["eps"], None))
            else:
                path = self.pert_path(enc, a, c["eps"], seed)
                if not path.is_file():
                    todo.append((a, c["eps"], path))
        if not todo:
            return []
        i, n = self.shard or (0, 1)
        k = i * len(todo) // n
        made = []
        for a, eps, path in todo[k:] + todo[:k]:
            if path is None:
                got = self.per_sample_images(enc, ds, a, eps, seed, dm, wait=False)
            else:
                got = self.perturbation(self.encoder(enc), path, a, eps, seed, wait=False)
            if got is not None:
                made.append(f"{a.label}@{_eps_tag(eps)}")
        return made

    def unit(self, enc: str, ds: DatasetSpec, m: MethodSpec, seed: int, label: str) -> None:
        from .api import evaluate
        from .models import load_model

        cells = self.unit_cells(enc, ds, m, seed)
        pending = [c for k, c in cells.items() if k not in self.rows]
        if not pending:
            return
        self.log(f"bench: {label}: {len(pending)} cell(s) to do")
        spec = dict(self.cfg.encoders)[enc]
        run = self.run_dir(enc, ds, m, seed)
        rel = str(run.relative_to(self.out))
        keep, source = self.continuation(enc, ds, m, seed)
        metrics = self.finetune_run(
            run, spec, ds, m.method, m.options, seed, self.cfg.whitebox, keep_last_epoch=keep, continue_from=source
        )
        if "continued_from" in metrics:  # its training time is the continued run's and its own
            before = float(metrics["continued_from"].get("train_seconds") or 0.0)
            metrics = {**metrics, "train_seconds": round(float(metrics.get("train_seconds") or 0.0) + before, 1)}
        dm = self.data(ds, seed)

        wb = [c for c in pending if c["setting"] == "whitebox"]
        if wb:
            t0 = time.time()
            val = evaluate(run, {}, datamodule=dm, device=str(self.dev), whitebox=True, split="val")["validation"]
            dt = round(time.time() - t0, 2)
            self.record(
                [
                    self._row(
                        c,
                        metrics,
                        clean_acc=metrics["clean_acc"],
                        robust_acc=metrics["robust_acc"][c["attack"]],
                        fooling_rate=metrics["fooling_rate"][c["attack"]],
                        val_clean_acc=val["clean_acc"],
                        val_robust_acc=val["robust_acc"][c["attack"]],
                        checks=_checks_text(metrics),
                        train_seconds=metrics.get("train_seconds"),
                        craft_seconds=0.0,
                        eval_seconds=dt,
                        run=rel,
                        perturbation="",
                    )
                    for c in wb
                ]
            )

        dae = [c for c in pending if c["setting"] in ("dae", "fresh-head")]
        if self.shared:
            self.claim_inputs(enc, ds, dae, seed, dm)
        perts, adv = {}, {}
        for c in dae:
            a: AttackSpec = c["spec"]
            c["pname"] = f"{a.label}@{_eps_tag(c['eps'])}"
            if a.per_sample:
                if c["pname"] not in adv:
                    adv[c["pname"]] = self.per_sample_images(enc, ds, a, c["eps"], seed, dm)
                continue
            path = self.pert_path(enc, a, c["eps"], seed)
            c["pfile"] = str(path.relative_to(self.out))
            perts[c["pname"]] = self.perturbation(
                self.encoder(enc) if not path.is_file() else None, path, a, c["eps"], seed
            )

        def used(cs):
            names = {c["pname"] for c in cs}
            return {k: v for k, v in perts.items() if k in names}, {k: v for k, v in adv.items() if k in names}

        main = [c for c in dae if c["setting"] == "dae"]
        if main:
            up, ua = used(main)
            self.record(self.evaluate_cells(run, main, up, dm, metrics, rel, adv=ua))

        fresh = [c for c in dae if c["setting"] == "fresh-head"]
        if fresh:
            from .encoders import save_encoder

            fh = run / "fresh-head"
            enc_file = run / "defended-encoder.safetensors"
            if not (fh / "metrics.json").is_file() and not enc_file.is_file():
                save_encoder(load_model(run).encoder, enc_file)
            fm = self.finetune_run(fh, f"file:{enc_file.resolve()}", ds, "lp", self.cfg.fresh_head, seed, None)
            up, ua = used(fresh)
            self.record(
                self.evaluate_cells(
                    fh, fresh, up, dm, metrics, str(fh.relative_to(self.out)), adv=ua, train_s=fm.get("train_seconds")
                )
            )

        selfc = [c for c in pending if c["setting"] == "self-attack"]
        if selfc:
            run_fp = self.run_fp(enc, ds, m, seed)
            folder = self.self_pert_dir(enc, ds, m, seed)
            defended = None
            sperts = {}
            for c in selfc:
                a = c["spec"]
                fp = self.pert_fp(f"self:{run_fp}", a, c["eps"], seed)
                path = folder / a.label / f"eps{_eps_tag(c['eps'])}-{fp}.safetensors"
                if defended is None and not path.is_file():
                    defended = load_model(run).encoder
                c["pname"] = f"self-{a.label}@{_eps_tag(c['eps'])}"
                c["pfile"] = str(path.relative_to(self.out))
                sperts[c["pname"]] = self.perturbation(defended, path, a, c["eps"], seed)
            self.record(self.evaluate_cells(run, selfc, sperts, dm, metrics, rel))

    def run(self) -> None:
        units = self.units(self.shard)
        where = self.where
        todo = sum(
            1 for (seed, enc, ds, m) in units for k in self.unit_cells(enc, ds, m, seed) if k not in self.rows
        )
        # one progress line per finished unit (a fine-tuned model and its cells), ETA from the cells done so far
        with Progress(todo, "bench", unit="cells", log=self.log) as bar:
            for i, (seed, enc, ds, m) in enumerate(units, 1):
                label = f"[{i}/{len(units)}]{where} {enc} / {ds.label} / {m.label} / seed {seed}"
                before = self.computed
                self.unit(enc, ds, m, seed, label)
                if self.computed > before:
                    bar.update(self.computed - before, f"{label} done")


def _pictures(pert, images, path: Path) -> None:
    """``*.delta.png`` and ``*.examples.png`` beside a perturbation, each written atomically."""
    from .visualize import save_perturbation_images

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pics-") as tmp:
        for p in save_perturbation_images(pert, images.subset(8), Path(tmp) / path.name):
            os.replace(p, path.parent / p.name)


def merge_shards(out_dir: str | os.PathLike, log=print) -> bool:
    """Merge ``OUT/shards/*.json`` into ``OUT/results.json`` / ``results.csv`` when together with
    the rows already there they hold every cell of ``OUT/bench.yaml``; returns whether they did.
    A folder without shard files is left as it is (True)."""
    out = Path(out_dir)
    if not list((out / "shards").glob("*-of-*.json")):
        return True
    if not (out / "bench.yaml").is_file():
        raise ConfigError(f"{out} holds shard results but no bench.yaml: was it written by genaf bench --shard?")
    with _lock(out):
        return _merge_locked(out, load_config(out / "bench.yaml"), log)


def _merge_locked(out: Path, cfg: BenchConfig, log) -> bool:
    # a merge computes nothing: it needs no GPU even when the bench ran on GPUs
    bench = Bench(dataclasses.replace(cfg, device="cpu"), out, log=lambda *_: None)
    wanted = bench.all_cells()
    bench.load_rows(wanted)
    missing = len(wanted) - len(bench.rows)
    if missing:
        tags = ", ".join(f.stem for f in bench.shard_files())
        log(f"bench: {missing} of {len(wanted)} cell(s) not done yet (shard files: {tags}); not merged")
        return False
    bench.save()
    log(f"bench: merged {len(bench.shard_files())} shard file(s) into {out / 'results.json'} ({len(wanted)} rows)")
    return True


def run_bench(
    config_path_or_dict: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    log=print,
    device=None,
    shard: tuple[int, int] | str | None = None,
    update_lock: bool = False,
    ray: str | bool | None = None,
    ray_cpus_per_task: int | None = None,
    ray_cpus: int | None = None,
) -> dict:
    """Run (or finish) the experiment matrix of a bench configuration into ``out_dir``.

    Returns ``{"rows": [...], "computed": n, "results": path, "report": path}``. Killed and
    started again with the same arguments, it continues where it stopped (module docstring).
    With ``shard=(I, N)`` (or ``"I/N"``) it runs only its share of the units and writes its rows
    to ``OUT/shards/I-of-N.json``; the last shard to finish merges (``results`` and ``report``
    are None until then).

    The sha256 of every encoder file is checked against ``OUT/encoders.lock.json`` (written on the
    first run); a changed file is a :class:`~genaf.errors.CheckpointError` unless ``update_lock``,
    which accepts it (module docstring).

    With ``ray`` (True or ``"local"``: a local Ray instance of ``ray_cpus`` CPUs; or the address of
    a running Ray cluster) the units run as Ray tasks of ``ray_cpus_per_task`` CPUs (and one GPU
    when the device is CUDA), with the same files and rows (:mod:`genaf.bench_ray`).
    """
    cfg = load_config(config_path_or_dict)
    if device is not None:
        cfg.device = str(device)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    out = Path(out_dir)
    t0 = time.time()
    if ray is not None and ray is not False:
        if shard:
            raise ConfigError(
                "--ray and --shard do not go together: Ray schedules every unit itself; give one of them"
            )
        from .bench_ray import run_bench_ray

        address = None if ray is True else str(ray)
        return run_bench_ray(
            config_path_or_dict, cfg, out, log, t0, update_lock, address, cpus_per_task=ray_cpus_per_task,
            num_cpus=ray_cpus,
        )
    if ray_cpus_per_task is not None or ray_cpus is not None:
        raise ConfigError("--ray-cpus-per-task and --ray-cpus go with --ray; add --ray or drop them")
    if shard:
        return _run_shard(config_path_or_dict, cfg, out, shard, log, t0, update_lock)
    with _lock(out):
        locked = _prepare_unsharded(config_path_or_dict, cfg, out, update_lock, log)
        bench = Bench(cfg, out, log, locked=locked)
        wanted = bench.all_cells()
        bench.load_rows(wanted)
        todo = len(wanted) - len(bench.rows)
        log(f"bench: {len(wanted)} cell(s), {todo} to do, output in {out}")
        bench.run()
        bench.save()
        from .bench_report import build_report

        report = build_report(out)
    log(f"bench: done in {time.time() - t0:.0f} s ({bench.computed} cell(s) computed); report: {report}")
    return {
        "rows": bench.sorted_rows(),
        "computed": bench.computed,
        "results": str(out / "results.json"),
        "report": str(report),
    }


def _prepare_unsharded(config_path_or_dict, cfg: BenchConfig, out: Path, update_lock: bool, log) -> dict:
    """What a run that holds OUT to itself does first: check the encoder lock, write ``bench.yaml``
    and ``bench-resolved.json``; returns the encoder lock entries by label."""
    locked, replaced = check_encoder_lock(cfg, out, update_lock, log)
    if isinstance(config_path_or_dict, dict):
        text = yaml.safe_dump(config_path_or_dict, sort_keys=False)
    else:
        text = Path(config_path_or_dict).read_text()
    atomic_write(out / "bench.yaml", lambda tmp: Path(tmp).write_text(text))
    write_json(out / "bench-resolved.json", cfg.to_dict())
    if replaced:
        _log_invalidated(cfg, out, locked, replaced, log)
    return locked


def _write_config(config_path_or_dict, cfg: BenchConfig, out: Path) -> None:
    if isinstance(config_path_or_dict, dict):
        text = yaml.safe_dump(config_path_or_dict, sort_keys=False)
    else:
        text = Path(config_path_or_dict).read_text()
    old = out / "bench.yaml"
    if old.is_file() and load_config(old).to_dict() != cfg.to_dict():
        raise ConfigError(
            f"{out} holds results of another configuration ({old}); shards of one bench must share one "
            "configuration: choose another --out"
        )
    atomic_write(old, lambda tmp: Path(tmp).write_text(text))
    write_json(out / "bench-resolved.json", cfg.to_dict())


def _run_shard(
    config_path_or_dict, cfg: BenchConfig, out: Path, shard: tuple[int, int], log, t0: float, update_lock: bool
) -> dict:
    with _lock(out, shard):
        _write_config(config_path_or_dict, cfg, out)
        locked, replaced = check_encoder_lock(cfg, out, update_lock, log)
        if replaced:
            _log_invalidated(cfg, out, locked, replaced, log)
        bench = Bench(cfg, out, log, shard=shard, locked=locked)
        mine = bench.shard_cells()
        wanted = {k: v for k, v in bench.all_cells().items() if k in mine}
        bench.load_rows(wanted)
        log(f"bench: shard {shard[0]}/{shard[1]}: {len(wanted)} cell(s), {len(wanted) - len(bench.rows)} to do")
        bench.run()
        bench.save()
        rows = bench.sorted_rows()
    log(f"bench: shard {shard[0]}/{shard[1]} done in {time.time() - t0:.0f} s ({bench.computed} cell(s) computed)")
    results = report = None
    try:
        merged = merge_shards(out, log)
    except ConfigError:  # another shard still holds the folder: the last one to finish merges
        merged = False
    if merged:
        from .bench_report import build_report

        results, report = str(out / "results.json"), str(build_report(out))
        rows = read_results(out)["rows"]  # every shard's: what the merged results.json holds
    else:
        log(f"bench: when every shard has finished, run: genaf report {out}")
    return {"rows": rows, "computed": bench.computed, "results": results, "report": report}


__all__ = [
    "run_bench",
    "merge_shards",
    "parse_shard",
    "load_config",
    "check_encoder_spec",
    "check_encoder_lock",
    "encoder_lock_entry",
    "read_results",
    "COLUMNS",
    "KEY_COLUMNS",
]
