"""``genaf assess ENCODER DATASET``: how exposed is a task to downstream-agnostic adversarial
examples, and is a defence worth its cost?

What it does, all from real runs (docs/ASSESS.md):

1. fine-tunes the encoder on the task with standard fine-tuning (SFT), cheaply: a capped training
   split and a few epochs (the flags say how many);
2. crafts the demo's universal DAE suite (``l4a-base``, ``ssp-universal``; ``cpu`` presets) on
   the **original** encoder from surrogate images the user names: by default the reserve of a
   public dataset other than the task (``rendered-digits`` for a Fashion-MNIST task, otherwise
   ``fashion-mnist-demo``), and with ``same_domain`` also the task's own surrogate reserve (the
   training images no split of the task uses: the worst case "if the attacker holds data of your
   domain"); ``uniform-noise`` of the same ε is the random control;
3. evaluates the SFT model on the test split: clean accuracy, robust accuracy under each DAE,
   the worst case and the noise control (the exposure);
4. recommends (``recommend``, a pure function whose rule is in its docstring and in
   docs/ASSESS.md) no defence, Gen-AF or an AT-family method, from the measured regimes in
   ``assets/regimes.json`` (or a file the user passes): the expected clean-accuracy cost and
   robust gain of the defence there;
5. times encoder passes on the user's encoder (:mod:`genaf.estimate`) and states the expected
   time of a Gen-AF and an AT fine-tune on the user's training split;
6. writes ``assess.json`` (everything, including what was read), ``assess.md`` and one plot,
   ``assess.png``, each atomically.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .errors import ConfigError, DataError, SpecError, unknown
from .utils import atomic_write, check_eps, parse_fraction, write_json

# The demo's DAE budget and suite (genaf.demo): the regimes were measured with them.
DAE_EPS = 16 / 255
DAES = ("l4a-base", "ssp-universal")
CONTROL = "uniform-noise"

# Sizes. Each cap applies only when the user does not give the size; the defaults are the demo's
# sizes, so that an assessment takes minutes on a CPU, not the hours of a full fine-tune.
SETTINGS = {
    "default": {"n_train": 3000, "n_val": 1000, "n_test": 2000, "n_surrogate": 1000, "epochs": 2, "iterations": None},
    # a smoke test: seconds, not a measurement
    "quick": {"n_train": 256, "n_val": 100, "n_test": 128, "n_surrogate": 64, "epochs": 1, "iterations": 4},
}
BATCH_SIZE = 128
# The SFT run's white-box PGD (outside the threat model, not part of the exposure) and the white-box
# parts of the evaluation's self-checks take this many steps instead of 10: they would cost more than
# the rest of the assessment.
WHITEBOX_STEPS = 2

# Datasets that are Fashion-MNIST: one image domain (the demo subset's images are Fashion-MNIST's).
FASHION_VARIANTS = ("fashion-mnist", "fashion-mnist-demo")
REGIMES_FILE = Path(__file__).resolve().parent / "assets" / "regimes.json"
REGIMES_SCHEMA = "genaf-regimes/1"
REGIMES_MAX_BYTES = 4 << 20  # a regimes file is a few kB; a larger one is refused before it is read

NO_DEFENCE = "no defence needed"
DEFENCE_FAMILIES = {"genaf": "Gen-AF", "at": "AT-family"}
METHOD_FAMILIES = ("none", "genaf", "at", "ablation")
# A nearest regime this many times more (or fewer) labels per class than the user's is said to be far.
FAR_RATIO = 3.0

RULE = (
    "exposure = SFT clean accuracy - accuracy under the worst universal DAE. No defence is needed when "
    "the DAEs do no more than the random control of the same eps, or when the exposure is no larger than "
    "the clean-accuracy cost of the cheapest defence that gained robust accuracy in the nearest measured "
    "regime (the defence would cost every input more than the attack takes). Otherwise the defence "
    "recommended is, among the defences of that regime that cost less clean accuracy than the exposure, "
    "the one with the highest clean + robust accuracy there (Gen-AF, or the best AT-family method). The "
    "nearest regime has the user's encoder family (ResNet, ViT) if any does, then the closest number of "
    "training labels per class (on a log scale), then the user's dataset if one of those has it."
)


# ------------------------------------------------------------------------------------------------
# regimes


def _regime_error(where: str, msg: str) -> ConfigError:
    return ConfigError(f"regimes file {where}: {msg}; fix the file (its fields: docs/ASSESS.md)")


def _percent(v, where: str, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 100.0):
        raise _regime_error(where, f"{what} must be a percentage in [0, 100], got {v!r}")
    return float(v) / 100.0


def validate_regimes(doc, where: str = "(given)") -> list[dict]:
    """The regimes of a parsed regimes file, checked and normalised: accuracies as fractions,
    each method's ``robust`` the regime's robust measure (the minimum over ``robust_per_attack``
    when the file gives one value per attack). A malformed file is a one-line ConfigError."""
    if not isinstance(doc, dict) or doc.get("schema") != REGIMES_SCHEMA:
        raise _regime_error(where, f'not a regimes file (it needs "schema": "{REGIMES_SCHEMA}")')
    regs = doc.get("regimes")
    if not isinstance(regs, list) or not regs:
        raise _regime_error(where, '"regimes" must be a non-empty list')
    out, names = [], set()
    for k, r in enumerate(regs):
        if not isinstance(r, dict):
            raise _regime_error(where, f"regime {k} is not an object")
        name = r.get("name")
        if not isinstance(name, str) or not name:
            raise _regime_error(where, f"regime {k} has no name")
        if name in names:
            raise _regime_error(where, f"two regimes are named '{name}'")
        names.add(name)
        at = f"regime '{name}'"
        src = r.get("source")
        if not isinstance(src, dict) or not (src.get("command") or src.get("config")):
            raise _regime_error(where, f'{at}: "source" must name the command or config that measured it')
        if not isinstance(src.get("split"), str) or not src.get("split"):
            raise _regime_error(where, f'{at}: "source" must name the split the numbers are from')
        seeds = src.get("seeds")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise _regime_error(where, f'{at}: "source" must list the seeds (whole numbers)')
        if not isinstance(r.get("encoder_family"), str) or not r["encoder_family"]:
            raise _regime_error(where, f'{at}: "encoder_family" is missing (e.g. resnet, vit)')
        for key, low in (("n_train", 1), ("num_classes", 2)):
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise _regime_error(where, f'{at}: "{key}" must be a whole number >= {low}, got {v!r}')
        try:
            eps = check_eps(parse_fraction(r.get("dae_eps")))
        except (ConfigError, TypeError, ValueError) as exc:
            raise _regime_error(
                where, f'{at}: "dae_eps" must be a budget like 16/255, got {r.get("dae_eps")!r}'
            ) from exc
        if not isinstance(r.get("robust_measure"), str) or not r["robust_measure"]:
            raise _regime_error(where, f'{at}: "robust_measure" must say what the robust accuracy is')
        methods = r.get("methods")
        if not isinstance(methods, dict) or "sft" not in methods:
            raise _regime_error(where, f'{at}: "methods" must hold "sft", the undefended baseline')
        rows = {}
        for m, row in methods.items():
            mw = f"{at}, method '{m}'"
            if not isinstance(row, dict) or row.get("family") not in METHOD_FAMILIES:
                raise _regime_error(where, f'{mw}: "family" must be one of {", ".join(METHOD_FAMILIES)}')
            per = row.get("robust_per_attack")
            if ("robust" in row) == (per is not None):
                raise _regime_error(where, f'{mw}: give exactly one of "robust" and "robust_per_attack"')
            if per is not None:
                if not isinstance(per, dict) or not per:
                    raise _regime_error(where, f'{mw}: "robust_per_attack" must map attacks to percentages')
                per_f = {a: _percent(v, where, f"{mw} robust accuracy under {a}") for a, v in per.items()}
                robust = min(per_f.values())
            else:
                per_f, robust = None, _percent(row["robust"], where, f"{mw} robust accuracy")
            run_as = row.get("method", m)
            if not isinstance(run_as, str) or not run_as or not isinstance(row.get("note", ""), str):
                raise _regime_error(where, f'{mw}: "method" and "note" must be text')
            rows[m] = {
                "family": row["family"],
                "method": run_as,
                **({"note": row["note"]} if row.get("note") else {}),
                "clean": _percent(row.get("clean"), where, f"{mw} clean accuracy"),
                "robust": robust,
                **({"robust_per_attack": per_f} if per_f else {}),
                **({"noise": _percent(row["noise"], where, f"{mw} noise accuracy")} if "noise" in row else {}),
            }
        if rows["sft"]["family"] != "none":
            raise _regime_error(where, f'{at}: "sft" is the undefended baseline; its family must be none')
        if not any(v["family"] in DEFENCE_FAMILIES for v in rows.values()):
            raise _regime_error(where, f"{at}: no defence (family genaf or at) to compare with sft")
        out.append(
            {
                "name": name,
                "source": dict(src),
                "encoder": r.get("encoder"),
                "encoder_family": r["encoder_family"],
                "dataset": r.get("dataset"),
                "n_train": r["n_train"],
                "num_classes": r["num_classes"],
                "labels_per_class": r["n_train"] / r["num_classes"],
                "dae_eps": eps,
                "robust_measure": r["robust_measure"],
                "methods": rows,
            }
        )
    return out


def load_regimes(path: str | Path | None = None) -> tuple[list[dict], str]:
    """(validated regimes, the path read): the shipped ``assets/regimes.json``, or ``path``."""
    p = Path(path) if path is not None else REGIMES_FILE
    if not p.is_file():
        raise ConfigError(f"regimes file {p} does not exist; pass a genaf regimes file (docs/ASSESS.md) to --regimes")
    size = p.stat().st_size
    if size > REGIMES_MAX_BYTES:
        raise ConfigError(f"regimes file {p} is {size} bytes, more than the {REGIMES_MAX_BYTES} a regimes file may be")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"regimes file {p} is not valid JSON ({exc}); fix the file") from exc
    return validate_regimes(doc, str(p)), str(p)


# ------------------------------------------------------------------------------------------------
# the recommendation


def encoder_family(meta: dict) -> str:
    """``resnet``, ``vit`` or the architecture's own name: what the regimes' ``encoder_family`` means."""
    arch = str(meta.get("arch") or "").lower()
    if any(k in arch for k in ("vit", "deit", "dino", "clip", "beit", "eva")):
        return "vit"
    if "resnet" in arch or "resnext" in arch:
        return "resnet"
    return arch or "unknown"


def regime_distance(exposure: dict, regime: dict) -> tuple[int, float, int]:
    """(0 for the user's encoder family, else 1; |log(labels per class ratio)|; 0 for the user's
    dataset, else 1): smaller is nearer, compared in that order (the dataset decides only
    between regimes equally near on the first two)."""
    lpc = max(float(exposure.get("labels_per_class") or 1.0), 1e-9)
    return (
        0 if regime["encoder_family"] == exposure.get("encoder_family") else 1,
        abs(math.log(lpc / regime["labels_per_class"])),
        0 if exposure.get("dataset") and regime.get("dataset") == exposure.get("dataset") else 1,
    )


def _accuracy_se(p: float, n: int) -> float:
    """The binomial standard error of an accuracy ``p`` measured on ``n`` images."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def recommend(exposure: dict, regimes: list[dict]) -> dict:
    """The recommendation for a measured exposure, by the rule in ``RULE`` (docs/ASSESS.md).

    ``exposure``: ``clean_acc`` (SFT's clean accuracy), ``dae`` (DAE name -> robust accuracy),
    optionally ``noise`` (accuracy under the random control), ``n_test``, ``encoder_family``,
    ``labels_per_class`` and ``eps``; accuracies as fractions. ``regimes``: from
    :func:`load_regimes` / :func:`validate_regimes`. Pure: reads nothing else, writes nothing.

    Returns ``verdict`` (``no defence needed``, ``Gen-AF`` or ``AT-family``), ``method`` (the
    regime's method recommended, or None), ``reason`` (one sentence), the ``exposure`` numbers, the
    ``regime`` used, the ``cheapest`` defence there, ``expected_clean_cost`` /
    ``expected_robust_gain`` / ``expected_clean_acc`` of the recommended defence (None without one),
    every ``candidate``, ``close_call`` and ``caveats``.
    """
    daes = dict(exposure.get("dae") or {})
    if not daes:
        raise ConfigError("recommend needs the robust accuracy under at least one DAE")
    if not regimes:
        raise ConfigError("recommend needs at least one measured regime")
    clean = float(exposure["clean_acc"])
    worst_name = min(daes, key=lambda k: (daes[k], k))
    worst = float(daes[worst_name])
    drop = clean - worst
    noise = exposure.get("noise")
    noise_drop = None if noise is None else clean - float(noise)
    n_test = int(exposure.get("n_test") or 0)

    ranked = sorted(regimes, key=lambda r: regime_distance(exposure, r))
    reg = ranked[0]
    rows = reg["methods"]
    base = rows["sft"]
    cands = []
    for m, row in rows.items():
        if row["family"] not in DEFENCE_FAMILIES:
            continue
        cands.append(
            {
                "method": m,
                "run_as": row["method"],
                **({"note": row["note"]} if row.get("note") else {}),
                "family": row["family"],
                "verdict": DEFENCE_FAMILIES[row["family"]],
                "clean": row["clean"],
                "robust": row["robust"],
                "clean_cost": base["clean"] - row["clean"],
                "robust_gain": row["robust"] - base["robust"],
                "score": row["clean"] + row["robust"],
            }
        )
    defences = [c for c in cands if c["robust_gain"] > 0]
    cheapest = min(defences, key=lambda c: (c["clean_cost"], -c["robust_gain"], c["method"])) if defences else None
    threshold = max(0.0, cheapest["clean_cost"]) if cheapest else None

    chosen = None
    if noise_drop is not None and drop <= max(0.0, noise_drop):
        reason = (
            f"the worst DAE ({worst_name}) takes {_pts(drop)} points of accuracy, no more than the random control of "
            f"the same eps ({_pts(noise_drop)} points): there is no DAE exposure to defend against"
        )
    elif cheapest is None:
        reason = f"no defence gained robust accuracy in the nearest measured regime ({reg['name']})"
    elif drop <= threshold:
        reason = (
            f"the worst DAE ({worst_name}) takes {_pts(drop)} points, no more than the {_pts(cheapest['clean_cost'])} "
            f"points of clean accuracy the cheapest defence ({cheapest['method']}) cost in regime {reg['name']}: the "
            "defence would cost every input more than the attack takes"
        )
    else:
        worthwhile = [c for c in defences if c["clean_cost"] < drop]
        chosen = max(worthwhile, key=lambda c: (c["score"], -c["clean_cost"], c["method"]))
        reason = (
            f"the worst DAE ({worst_name}) takes {_pts(drop)} points, more than the "
            f"{_pts(chosen['clean_cost'])} points of clean accuracy {chosen['method']} cost in regime {reg['name']}, "
            f"where it gained {_pts(chosen['robust_gain'])} points of robust accuracy and had the best clean + robust "
            "accuracy of the defences worth their cost"
        )

    se = math.hypot(_accuracy_se(clean, n_test), _accuracy_se(worst, n_test)) if n_test else None
    close = bool(se is not None and threshold is not None and abs(drop - threshold) < 2 * se)
    caveats = []
    dist = regime_distance(exposure, reg)
    if dist[0]:
        caveats.append(
            f"no measured regime has your encoder family ({exposure.get('encoder_family')}); the nearest, "
            f"{reg['name']}, is {reg['encoder_family']}"
        )
    if math.exp(dist[1]) > FAR_RATIO:
        caveats.append(
            f"your task has {exposure.get('labels_per_class', 0):.0f} training labels per class, the regime "
            f"{reg['labels_per_class']:.0f}: its costs may not carry over"
        )
    eps = exposure.get("eps")
    if eps is not None and abs(float(eps) - reg["dae_eps"]) > 1e-9:
        caveats.append(f"the regime was measured at eps {reg['dae_eps']:.4f}, your DAEs at {float(eps):.4f}")
    if close:
        caveats.append(
            f"a close call: the exposure is within two standard errors ({_pts(2 * se)} points on {n_test} test "
            "images) of the cheapest defence's cost; measure on more test images (--n-test) before deciding"
        )
    return {
        "verdict": chosen["verdict"] if chosen else NO_DEFENCE,
        "method": chosen["method"] if chosen else None,
        "run_as": chosen["run_as"] if chosen else None,
        "reason": reason,
        "rule": RULE,
        "exposure": {
            "clean_acc": clean,
            "worst_attack": worst_name,
            "worst_acc": worst,
            "drop": drop,
            "noise_drop": noise_drop,
            "drop_beyond_noise": None if noise_drop is None else drop - noise_drop,
            "drop_se": se,
        },
        "regime": {
            "name": reg["name"],
            "source": reg["source"],
            "encoder_family": reg["encoder_family"],
            "labels_per_class": reg["labels_per_class"],
            "robust_measure": reg["robust_measure"],
            "sft": {"clean": base["clean"], "robust": base["robust"]},
            "distance": {
                "same_family": not dist[0],
                "log_labels_per_class_ratio": dist[1],
                "same_dataset": not dist[2],
            },
        },
        "cheapest": cheapest,
        "expected_clean_cost": chosen["clean_cost"] if chosen else None,
        "expected_robust_gain": chosen["robust_gain"] if chosen else None,
        "expected_clean_acc": min(1.0, max(0.0, clean - chosen["clean_cost"])) if chosen else None,
        "candidates": sorted(cands, key=lambda c: -c["score"]),
        "close_call": close,
        "caveats": caveats,
    }


def _pts(v: float) -> str:
    return f"{100 * v:.1f}"


# ------------------------------------------------------------------------------------------------
# data


def default_surrogate(dataset: str) -> str:
    """A public dataset other than the task: rendered digits for a Fashion-MNIST task, else the
    shipped Fashion-MNIST subset (both offline)."""
    return "rendered-digits" if dataset in FASHION_VARIANTS else "fashion-mnist-demo"


def domain(spec: str) -> str:
    """The image domain of a dataset spec (the Fashion-MNIST variants are one domain)."""
    return "fashion-mnist" if spec in FASHION_VARIANTS else spec


def short_name(spec: str) -> str:
    """A dataset spec for labels: ``imagefolder:/a/b/pets`` -> ``imagefolder:pets``."""
    if spec.startswith("imagefolder:"):
        return "imagefolder:" + (Path(spec.split(":", 1)[1]).name or spec.split(":", 1)[1])
    return spec


def check_dataset_spec(spec: str, what: str) -> None:
    """An unknown dataset name is a one-line error before anything runs."""
    from .data import DATASETS

    if not isinstance(spec, str) or not spec or not (spec in DATASETS or spec.startswith("imagefolder:")):
        err = unknown("dataset", str(spec), list(DATASETS) + ["imagefolder:PATH"])
        raise SpecError(f"{what}: {err}")


def _raw_counts(spec: str, root, download: bool, image_size) -> tuple[int, int | None, int]:
    """(training images, fixed reserve or None, test images) of a dataset, read as cheaply as
    possible (an image folder is listed, not decoded)."""
    from .data.module import DATASETS

    if spec.startswith("imagefolder:"):
        from .data.imagefolder import load_imagefolder_raw

        raw = load_imagefolder_raw(spec.split(":", 1)[1], image_size)
    else:
        raw = DATASETS[spec](root=root, download=download)
    extra = raw[5] if len(raw) > 5 else None
    fixed = extra.get("fixed_reserve") if isinstance(extra, dict) else None
    return len(raw[1]), (None if fixed is None else int(fixed)), len(raw[3])


def plan_sizes(dataset: str, data: dict, setting: dict) -> dict:
    """The split sizes of the assessment and of the user's full task.

    A size the user gives is used as given. Otherwise: validation ``min(cap, 10 %)`` of the
    training images outside the surrogate reserve (``genaf finetune``'s default fraction), training
    ``min(cap, the rest)``, test ``min(cap, the test split)``. ``n_train_task`` is what
    ``genaf finetune`` with the same flags trains on (the defence's cost is estimated for it)."""
    from .data.module import default_reserve

    n, fixed, n_test_all = _raw_counts(dataset, data.get("root"), bool(data.get("download")), data.get("image_size"))
    reserve = data.get("surrogate_reserve")
    nr = fixed if fixed is not None and reserve is None else (default_reserve(n) if reserve is None else int(reserve))
    m = n - nr
    if m < 2:
        raise DataError(
            f"{dataset} has {n} training images, {nr} of them in the surrogate reserve: too few to fine-tune and "
            "validate on; add images or lower --surrogate-reserve"
        )
    default_val = max(1, int(round(0.1 * m)))
    nv = data.get("n_val") or min(setting["n_val"], default_val)
    nt = data.get("n_train") or min(setting["n_train"], m - nv)
    n_test = data.get("n_test") or min(setting["n_test"], n_test_all)
    task_val = data.get("n_val") or default_val
    return {
        "n_train": int(nt),
        "n_val": int(nv),
        "n_test": int(n_test),
        "n_train_task": int(data.get("n_train") or max(1, m - task_val)),
        "train_pool": int(m),
    }


# ------------------------------------------------------------------------------------------------
# the cost of a defence


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def defence_cost(model, data, n_train: int, batch_size: int, device) -> dict:
    """Expected fine-tuning time of Gen-AF and AT on ``n_train`` images: one timed forward +
    backward pass of ``model`` on a training batch, times the passes of each method's stages
    (:mod:`genaf.estimate`), with each method's defaults and with the demo's budget (the budget
    of the regimes' demo rows)."""
    from .demo import SETTINGS as DEMO_SETTINGS
    from .demo import method_plan
    from .estimate import estimate_seconds, time_one_pass
    from .methods.base import create_method

    model = model.to(device)
    bs = min(batch_size, len(data.train))
    x, y, _ = next(iter(data.train.batches(bs, device=device)))
    per_pass = time_one_pass(model, x, y)
    per_image = per_pass / bs  # the pass was timed on bs images; the estimate runs batch_size ones
    seconds_per_batch = per_image * batch_size
    demo_plan = method_plan(DEMO_SETTINGS["full"])
    out = {"seconds_per_pass": per_pass, "timed_batch": bs, "batch_size": batch_size, "n_train": n_train, "rows": []}
    for method in ("genaf", "at"):
        for budget, cfg in (("defaults", {}), ("demo budget", demo_plan[method][1])):
            meth = create_method(method, **cfg)
            est = estimate_seconds(seconds_per_batch, n_train, batch_size, meth.stages(), meth.cfg)
            flags = " ".join(
                f"--set {k}={v}" if k not in ("epochs", "attack_steps") else f"--{k.replace('_', '-')} {v}"
                for k, v in cfg.items()
                if k != "probe_size"
            )
            out["rows"].append(
                {
                    "method": method,
                    "budget": budget,
                    "options": {k: v for k, v in cfg.items() if k != "probe_size"},
                    "flags": flags,
                    "seconds": est["seconds"],
                    "stages": est["stages"],
                    "batches_per_epoch": est["batches_per_epoch"],
                }
            )
    return out


# ------------------------------------------------------------------------------------------------
# the run


def check_out(out: Path) -> None:
    """``--out`` must be a new or empty folder (an assessment never mixes with another's files)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; choose a folder for the assessment")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty (an earlier assessment?); choose a new folder or delete that one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be created ({exc.strerror}); choose a writable place") from exc


def _silent(*_a, **_k) -> None:
    pass


def run_assess(
    encoder: str,
    dataset: str,
    out: str | Path = "assess-run",
    *,
    surrogate: str | None = None,
    same_domain: bool = False,
    eps: float = DAE_EPS,
    epochs: int | None = None,
    quick: bool = False,
    n_surrogate: int | None = None,
    regimes: str | Path | None = None,
    data: dict | None = None,
    batch_size: int = BATCH_SIZE,
    device: str = "auto",
    seed: int = 0,
    log=print,
) -> dict:
    """Assess ``encoder`` on ``dataset`` (see the module docstring); returns what ``assess.json`` holds."""
    from .api import check_seed, craft, evaluate, finetune, surrogate_record
    from .attacks.universal import encoder_hash
    from .data import load_dataset
    from .encoders import load_encoder
    from .models import load_model
    from .utils import resolve_device

    log = log or _silent
    t0 = time.time()
    setting = SETTINGS["quick" if quick else "default"]
    eps = check_eps(eps)
    check_seed(seed)
    epochs = setting["epochs"] if epochs is None else int(epochs)
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if n_surrogate is not None and int(n_surrogate) < 1:
        raise ConfigError(f"--n-surrogate must be positive, got {n_surrogate}")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    data = {k: v for k, v in (data or {}).items() if v is not None}
    for k in ("n_train", "n_val", "n_test"):
        if k in data and int(data[k]) <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be positive, got {data[k]}")
    check_dataset_spec(dataset, "the task")
    sur_spec = surrogate or default_surrogate(dataset)
    check_dataset_spec(sur_spec, "--surrogate")
    regs, regimes_path = load_regimes(regimes)
    dev = resolve_device(device)
    out = Path(out)
    check_out(out)

    # what is read: the task's splits, the encoder, the surrogate images
    sizes = plan_sizes(dataset, data, setting)
    dm = load_dataset(
        dataset,
        root=data.get("root"),
        image_size=data.get("image_size"),
        n_train=sizes["n_train"],
        n_val=sizes["n_val"],
        n_test=sizes["n_test"],
        seed=seed,
        download=bool(data.get("download")),
        surrogate_reserve=data.get("surrogate_reserve"),
    )
    enc = load_encoder(encoder)
    enc_hash = encoder_hash(enc)
    log(
        f"assess: {encoder} on {dataset}: {len(dm.train)} train / {len(dm.val)} val / {len(dm.test)} test images "
        f"(the task's training split: {sizes['n_train_task']}), eps {eps:.4f}, seed {seed}"
    )
    sources = []  # (key, label, images, of the task's domain)
    same = domain(sur_spec) == domain(dataset)
    if sur_spec == dataset:
        sur_dm = dm
    else:
        sur_dm = load_dataset(
            sur_spec,
            image_size=dm.image_size,
            n_train=1,
            n_val=1,
            n_test=1,
            seed=seed,
            download=bool(data.get("download")),
        )
    first = _surrogate_images(sur_dm, n_surrogate, setting)
    sources.append(("same-domain" if same else "public", short_name(sur_spec), first, same))
    if same_domain and not same:
        sources.append(("same-domain", "same domain", _surrogate_images(dm, n_surrogate, setting), True))
    elif same_domain:
        log(f"assess: the surrogate {sur_spec} is already of the task's domain; --same-domain adds nothing")

    # 1. SFT, cheaply
    run = out / "sft"
    log(f"--- SFT: {epochs} epoch(s) on {len(dm.train)} images ---")
    finetune(
        encoder,
        dataset,
        "sft",
        run,
        config={"eval": {"whitebox": {"steps": WHITEBOX_STEPS}}},
        method_config={"epochs": epochs},
        seed=seed,
        train={"batch_size": int(batch_size), "device": str(dev)},
        data={
            "n_train": sizes["n_train"],
            "n_val": sizes["n_val"],
            "n_test": sizes["n_test"],
            **{k: data[k] for k in ("root", "image_size", "download", "surrogate_reserve") if k in data},
        },
        datamodule=dm,
        log=log,
    )

    # 2. the DAE suite on the original encoder, and the random control
    perts, meta = {}, {}
    iters = {"iterations": setting["iterations"]} if setting["iterations"] else {}
    for key, label, images, is_same in sources:
        for attack in DAES:
            name = f"{attack} ({label})"
            path = out / "perturbations" / key / f"{attack}.safetensors"
            log(f"--- crafting {name} from {len(images)} surrogate images ---")
            perts[name] = craft(
                enc,
                attack,
                images,
                eps,
                preset="cpu",
                seed=seed,
                surrogate_name=f"{images.dataset} surrogate reserve ({len(images)} images, in no split of the task)",
                device=str(dev),
                out=path,
                log=log,
                **iters,
            )
            meta[name] = {
                "attack": attack,
                "kind": "dae",
                "source": key,
                "surrogate": images.dataset,
                "same_domain": is_same,
                "file": str(path),
            }
    control = f"{CONTROL} (control)"
    path = out / "perturbations" / f"{CONTROL}.safetensors"
    perts[control] = craft(
        enc, CONTROL, sources[0][2], eps, preset="cpu", seed=seed, device=str(dev), out=path, log=log
    )
    meta[control] = {
        "attack": CONTROL,
        "kind": "control",
        "source": None,
        "surrogate": None,
        "same_domain": None,
        "file": str(path),
    }

    # 3. the exposure
    m = evaluate(run, perts, datamodule=dm, device=str(dev), log=log)
    ra = m["robust_acc"]
    dae = {k: float(ra[k]) for k, v in meta.items() if v["kind"] == "dae"}
    worst = min(dae, key=lambda k: (dae[k], k))
    by_source = {}
    for key, label, _images, _s in sources:
        names = [k for k, v in meta.items() if v["source"] == key]
        w = min(names, key=lambda k: (dae[k], k))
        by_source[key] = {"label": label, "attack": w, "acc": dae[w]}
    model = load_model(run, dev)
    exposure = {
        "clean_acc": float(m["clean_acc"]),
        "n_test": int(m["n_test"]),
        "dae": dae,
        "noise": float(ra[control]),
        "noise_name": control,
        "worst": {"attack": worst, "acc": dae[worst], "drop": float(m["clean_acc"]) - dae[worst]},
        "worst_by_source": by_source,
        "encoder_family": encoder_family(enc.meta),
        "num_classes": dm.num_classes,
        "n_train_task": sizes["n_train_task"],
        "dataset": dataset,
        "labels_per_class": sizes["n_train_task"] / dm.num_classes,
        "eps": eps,
    }

    # 4. the recommendation, 5. the cost of the defence
    rec = recommend(exposure, regs)
    cost = defence_cost(model, dm, sizes["n_train_task"], int(batch_size), dev)
    seconds = time.time() - t0
    result = {
        "encoder": {
            "spec": encoder,
            "hash": enc_hash,
            "arch": enc.meta.get("arch"),
            "family": exposure["encoder_family"],
            "files": list(getattr(enc, "source_files", [])),
        },
        "dataset": {**dm.info, "num_classes": dm.num_classes, "classes": list(dm.classes)},
        "sizes": sizes,
        "surrogates": [
            {
                "source": key,
                "label": label,
                "same_domain": s,
                **{k: v for k, v in surrogate_record(images).items() if k != "indices"},
            }
            for key, label, images, s in sources
        ],
        "eps": eps,
        "seed": seed,
        "quick": bool(quick),
        "sft": {"epochs": epochs, "batch_size": int(batch_size), "run": str(run), "checks": m.get("checks")},
        "device": str(dev),
        "suite": {"daes": list(DAES), "control": CONTROL, "preset": "cpu", **iters},
        "perturbations": meta,
        "exposure": exposure,
        "recommendation": rec,
        "regimes_file": regimes_path,
        "defence_cost": cost,
        "seconds": round(seconds, 1),
    }
    figure = out / "assess.png"
    save_exposure_plot(result, figure)
    write_json(out / "assess.json", result)
    text = report_markdown(result, figure.name)
    atomic_write(out / "assess.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log(f"assess: report {out / 'assess.md'} ({seconds:.0f} s)")
    return result


def _surrogate_images(dm, n: int | None, setting: dict):
    """``n`` images of ``dm``'s surrogate reserve (exactly, or an error), or by default as many
    as the setting asks for and the reserve holds."""
    if n is not None:
        return dm.surrogate(int(n))
    have = len(dm.surrogate_pool)
    if have == 0:
        raise DataError(
            f"the surrogate reserve of {dm.name} is empty; give it one (--surrogate-reserve N) or name another "
            "--surrogate dataset"
        )
    return dm.surrogate(min(setting["n_surrogate"], have))


# ------------------------------------------------------------------------------------------------
# the report


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def exposure_figure(result: dict):
    """Bars: SFT's clean accuracy, its accuracy under each DAE (coloured by the surrogate data),
    the random control (hatched), the worst case outlined; ± one binomial standard error; a dashed
    line at the clean accuracy the recommended (or cheapest) defence is expected to keep."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ex, rec = result["exposure"], result["recommendation"]
    n = ex["n_test"]
    colours = {"public": "tab:blue", "same-domain": "tab:red"}
    bars = [("clean", ex["clean_acc"], "0.35", None)]
    for name, acc in ex["dae"].items():
        bars.append((name, acc, colours.get(result["perturbations"][name]["source"], "tab:purple"), None))
    bars.append((ex["noise_name"], ex["noise"], "0.85", "//"))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(bars) + 3), 4.8))
    worst = ex["worst"]["attack"]
    for i, (name, acc, colour, hatch) in enumerate(bars):
        ax.bar(
            i,
            100 * acc,
            0.7,
            yerr=100 * _accuracy_se(acc, n),
            capsize=3,
            error_kw={"ecolor": "0.3", "lw": 1.0},
            color=colour,
            hatch=hatch,
            edgecolor="black" if name == worst else "0.3",
            lw=2.5 if name == worst else 0.6,
        )
        ax.text(
            i,
            100 * acc - 1.5,
            f"{100 * acc:.1f}",
            ha="center",
            va="top",
            fontsize=8,
            color="black" if hatch else "white",
            fontweight="bold",
        )
    ref = rec.get("method") and rec["expected_clean_acc"]
    handles = [Patch(color="0.35", label="clean accuracy (SFT)")]
    for key, label in (("public", "DAE, public surrogate data"), ("same-domain", "DAE, surrogate data of your domain")):
        if any(v["source"] == key for v in result["perturbations"].values()):
            handles.append(Patch(color=colours[key], label=label))
    handles += [
        Patch(facecolor="0.85", edgecolor="0.3", hatch="//", label="control: uniform noise of the same ε"),
        Patch(facecolor="white", edgecolor="black", lw=2.5, label=f"worst case: {worst}"),
    ]
    line = None
    if ref:
        line = (
            ref,
            f"clean accuracy expected with {rec['method']}\n"
            f"(it cost {_pts(rec['expected_clean_cost'])} points in regime {rec['regime']['name']})",
        )
    elif rec.get("cheapest"):
        c = rec["cheapest"]
        line = (
            ex["clean_acc"] - max(0.0, c["clean_cost"]),
            f"clean accuracy expected with the cheapest defence, {c['method']}\n"
            f"(it cost {_pts(c['clean_cost'])} points in regime {rec['regime']['name']})",
        )
    if line is not None:
        ax.axhline(100 * line[0], color="black", ls="--", lw=1.2)
        handles.append(Line2D([], [], color="black", ls="--", lw=1.2, label=line[1]))
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[0] for b in bars], rotation=25, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"accuracy on {n} test images (%)")
    ax.set_xlabel("evaluation (universal perturbations crafted on the original encoder)")
    ax.grid(axis="y", alpha=0.3)
    ds = short_name(result["dataset"]["spec"])
    from .visualize import eps_text

    ax.set_title(
        f"DAE exposure of {result['encoder']['spec']} fine-tuned (SFT) on {ds}\n"
        f"ε = {eps_text(result['eps'])}, seed {result['seed']}; recommendation: {rec['verdict']}",
        fontsize=10,
    )
    ax.legend(
        handles=handles,
        fontsize=8,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        title="error bars: ± 1 standard error (one seed)",
        title_fontsize=8,
    )
    return fig


def save_exposure_plot(result: dict, path: Path) -> None:
    fig = exposure_figure(result)

    def w(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        atomic_write(path, w)
    finally:
        _plt().close(fig)


def report_markdown(result: dict, figure: str) -> str:
    """``assess.md``: what was measured, the exposure table, the plot, the recommendation and the
    defence's estimated cost."""
    from .visualize import eps_text

    ex, rec, enc, ds = result["exposure"], result["recommendation"], result["encoder"], result["dataset"]
    clean, noise_drop = ex["clean_acc"], ex["clean_acc"] - ex["noise"]
    surs = "; ".join(
        f"{s['n']} images of the {s['dataset']} surrogate reserve ({'your domain' if s['same_domain'] else 'public'}, "
        f"indices sha256 {s['indices_sha256']})"
        for s in result["surrogates"]
    )
    lines = [
        f"# genaf assess: {enc['spec']} on {short_name(ds['spec'])}",
        "",
        f"Encoder `{enc['spec']}` ({enc['arch']}, hash {enc['hash']}), fine-tuned with SFT for "
        f"{result['sft']['epochs']} epoch(s) on {ds['n_train']} training images of `{ds['spec']}` (validation "
        f"{ds['n_val']}, test {ds['n_test']}; your full training split: {result['sizes']['n_train_task']} images), "
        f"seed {result['seed']}.",
        f"DAEs: {', '.join(DAES)} (`cpu` presets), universal perturbations at ε = {eps_text(result['eps'])} crafted on "
        f"the original encoder from {surs}. `{CONTROL}` is the random control of the same ε.",
    ]
    if result["quick"]:
        lines += ["", "**Quick setting: a smoke test, not a measurement.**"]
    lines += [
        "",
        "| evaluation | surrogate data | accuracy (%) | drop (points) | drop beyond noise (points) |",
        "|---|---|---:|---:|---:|",
        f"| clean | — | {_pts(clean)} | — | — |",
    ]
    for name, acc in sorted(ex["dae"].items(), key=lambda kv: kv[1]):
        p = result["perturbations"][name]
        where = f"{p['surrogate']} ({'your domain' if p['same_domain'] else 'public'})"
        mark = " **(worst case)**" if name == ex["worst"]["attack"] else ""
        lines.append(
            f"| {name}{mark} | {where} | {_pts(acc)} | {_pts(clean - acc)} | {_pts(clean - acc - noise_drop)} |"
        )
    lines.append(f"| {ex['noise_name']} | — | {_pts(ex['noise'])} | {_pts(noise_drop)} | — |")
    lines += [""]
    for key, w in ex["worst_by_source"].items():
        who = "if the attacker holds data of your domain" if key == "same-domain" else f"from {w['label']} data"
        lines.append(f"- Worst case {who}: {w['attack']}, {_pts(w['acc'])} % ({_pts(clean - w['acc'])} points lost).")
    checks = result["sft"].get("checks") or {}
    if checks.get("failed"):
        lines.append(
            f"- **Evaluation self-checks FAILED: {', '.join(checks['failed'])}** — do not trust these numbers "
            "before finding out why."
        )
    elif checks:
        lines.append("- Evaluation self-checks: all passed.")
    lines += ["", f"![DAE exposure: clean accuracy, each DAE, the noise control and the worst case]({figure})", ""]
    reg = rec["regime"]
    lines += [
        "## Recommendation",
        "",
        f"**{rec['verdict']}**" + (f" (`{rec['method']}`)" if rec["method"] else "") + f": {rec['reason']}.",
        "",
    ]
    if rec["method"]:
        lines.append(
            f"Expected: about {_pts(rec['expected_clean_cost'])} points of clean accuracy (≈ "
            f"{_pts(rec['expected_clean_acc'])} % instead of {_pts(clean)} %) for {_pts(rec['expected_robust_gain'])} "
            f"points of robust accuracy ({reg['robust_measure']}), as measured in regime `{reg['name']}`."
        )
    src = reg["source"]
    lines += [
        "",
        f"Regime `{reg['name']}`: {reg['encoder_family']}, {reg['labels_per_class']:.0f} labels per class (yours: "
        f"{ex['labels_per_class']:.0f}); measured by `{src.get('command') or src.get('config')}` on the "
        f"{src['split']} split, seed(s) {', '.join(map(str, src['seeds']))}"
        + (f", {src['date']}" if src.get("date") else "")
        + f". Regimes file: `{result['regimes_file']}`.",
        "",
        "| defence in the regime | clean cost (points) | robust gain (points) | clean + robust (%) |",
        "|---|---:|---:|---:|",
    ]
    for c in rec["candidates"]:
        what = c["verdict"] + (f"; {c['note']}" if c.get("note") else "")
        lines.append(
            f"| {c['method']} ({what}) | {_pts(c['clean_cost'])} | {_pts(c['robust_gain'])} | {_pts(c['score'])} |"
        )
    lines += ["", f"The rule: {rec['rule']}"]
    if rec["caveats"]:
        lines += ["", "Caveats:", *[f"- {c}" for c in rec["caveats"]]]
    cost = result["defence_cost"]
    lines += [
        "",
        "## Estimated cost of the defence",
        "",
        f"One forward + backward pass of the model on {cost['timed_batch']} training images took "
        f"{cost['seconds_per_pass']:.3f} s on {result['device']}; each fine-tune below is that, scaled to batches of "
        f"{cost['batch_size']}, times the batches and the encoder passes of every epoch (attack steps included) on "
        f"your {cost['n_train']} training images. Rough (within about a factor of two): validation, stage-2 scoring "
        "and the evaluation are not counted.",
        "",
        "| method | budget | estimated time | command |",
        "|---|---|---:|---|",
    ]
    for r in cost["rows"]:
        cmd = (
            f"genaf finetune --encoder {enc['spec']} --dataset {ds['spec']} --method {r['method']} {r['flags']}".strip()
        )
        lines.append(
            f"| {r['method']} | {r['budget']} | {human_seconds(r['seconds'])} | `{cmd} --out runs/{r['method']}` |"
        )
    lines += ["", f"Wall time of this assessment: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """The short summary ``genaf assess`` prints."""
    ex, rec = result["exposure"], result["recommendation"]
    lines = [
        f"SFT clean accuracy {_pts(ex['clean_acc'])}% on {ex['n_test']} test images; "
        + ", ".join(f"{k} {_pts(v)}%" for k, v in ex["dae"].items())
        + f", {ex['noise_name']} {_pts(ex['noise'])}%",
        f"worst case: {ex['worst']['attack']} {_pts(ex['worst']['acc'])}% ({_pts(ex['worst']['drop'])} points lost)",
    ]
    head = f"recommendation: {rec['verdict']}" + (f" ({rec['method']})" if rec["method"] else "")
    if rec["method"]:
        head += (
            f": expected clean-accuracy cost {_pts(rec['expected_clean_cost'])} points, robust gain "
            f"{_pts(rec['expected_robust_gain'])} points (regime {rec['regime']['name']})"
        )
        run_as = rec.get("run_as") or rec["method"]
        row = next((r for r in result["defence_cost"]["rows"] if r["method"] == run_as), None)
        if row is None:  # an AT-family method other than at (TRADES, MART, ...): at's time is the nearest estimate
            row = next((r for r in result["defence_cost"]["rows"] if r["method"] == "at"), None)
        if row is not None:
            head += f"; estimated fine-tune time {human_seconds(row['seconds'])} ({row['method']}, {row['budget']})"
    else:
        head += f": {rec['reason']}"
    lines.append(head)
    lines += [f"caveat: {c}" for c in rec["caveats"]]
    return lines
