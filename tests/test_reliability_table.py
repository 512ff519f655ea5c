"""Every bad input we know of ends with a one-line error naming the problem and exit code 2.

Running this file regenerates docs/RELIABILITY.md (the table of inputs tried and outcomes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from genaf.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"


def _png(path: Path, size: int = 8, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), 128 if mode == "L" else (128, 128, 128)).save(path)


def _folder(root: Path, classes: int, bad: bool = False, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for c in range(classes):
            for i in range(per_class if split == "train" else 2):
                _png(root / split / f"c{c:02d}" / f"{i}.png")
    if bad:
        (root / "train" / "c00" / "broken.png").write_bytes(b"this is not a png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_data):
    """Inputs for the cases: a finished tiny run, image folders, perturbation and config files."""
    from genaf import api
    from genaf.attacks.perturbation import Perturbation

    t = tmp_path_factory.mktemp("bad")
    run = t / "run"
    api.finetune(
        "random:demo",
        "fashion-mnist",
        "sft",
        run,
        method_config={"epochs": 1},
        train={"batch_size": 32, "progress": False},
        data={"n_train": 64, "n_val": 32, "n_test": 32},
        log=lambda *a: None,
    )
    f = {"run": run, "tmp": t}
    f["unreadable"] = _folder(t / "unreadable", 2, bad=True)
    f["twelve"] = _folder(t / "twelve", 12, per_class=10)
    (t / "empty" / "train").mkdir(parents=True)
    (t / "empty" / "test").mkdir(parents=True)
    f["empty"] = t / "empty"
    f["corrupt"] = t / "corrupt.pt"
    f["corrupt"].write_bytes(b"\x00\x01garbage" * 10)
    f["truncated"] = t / "truncated.pt"
    good = t / "good.pt"
    Perturbation(delta=torch.zeros(1, 1, 28, 28), eps=16 / 255, attack="x").save(good)
    f["truncated"].write_bytes(good.read_bytes()[:100])
    f["other_kind"] = t / "weights.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, str(f["other_kind"]))
    meta = {"genaf_perturbation": json.dumps({"kind": "additive", "eps": 16 / 255, "attack": "x"})}
    f["nan"] = t / "nan.pt"
    save_file({"delta": torch.full((1, 1, 28, 28), float("nan"))}, str(f["nan"]), metadata=meta)
    f["big"] = t / "big.pt"
    Perturbation(delta=torch.zeros(1, 1, 32, 32), eps=16 / 255, attack="x").save(f["big"])
    f["two"] = t / "two_channels.pt"
    Perturbation(delta=torch.zeros(1, 2, 28, 28), eps=16 / 255, attack="x").save(f["two"])
    f["yaml"] = t / "typo.yaml"
    f["yaml"].write_text("encoder: random:demo\nmethd: sft\n")
    f["yaml_sub"] = t / "typo_sub.yaml"
    f["yaml_sub"].write_text("data:\n  n_trian: 10\n")
    f["bad_yaml"] = t / "bad.yaml"
    f["bad_yaml"].write_text("encoder: [unclosed\n")
    f["nan_enc"] = t / "nan_encoder.safetensors"
    from genaf.encoders import load_encoder
    from genaf.encoders.files import save_encoder

    enc = load_encoder("random:demo")
    with torch.no_grad():
        next(enc.parameters()).fill_(float("nan"))
    save_encoder(enc, f["nan_enc"])
    return f


# tiny splits and one epoch: should a check come late, the case still ends in seconds
FT0 = ["finetune", "--encoder", "random:demo", "--out", "{tmp}/r"]
FT = FT0 + ["--n-train", "64", "--n-val", "32", "--n-test", "32", "--epochs", "1"]  # later flags win
EV = ["evaluate", "--model", "{run}", "--perturbation"]

# (what is wrong, argv, text the one-line error must contain)
CASES = [
    ("misspelt method", FT + ["--method", "genfa"], "did you mean 'genaf'"),
    ("unknown method", FT + ["--method", "nosuch"], "unknown method"),
    ("misspelt dataset", FT + ["--dataset", "fashion-mnst"], "did you mean 'fashion-mnist'"),
    ("unknown encoder scheme", ["inspect", "nosuch:thing"], "unknown encoder spec scheme"),
    ("misspelt encoder name", ["inspect", "dem"], "did you mean"),
    ("encoder file missing", ["inspect", "file:/does/not/exist.pt"], "does not exist"),
    ("solo-learn checkpoint missing", ["inspect", "solo:/does/not/exist.ckpt"], "exist"),
    ("torchvision spec without a path", ["inspect", "torchvision:resnet18"], "torchvision:ARCH:PATH"),
    ("encoder weights with NaN", ["inspect", "file:{nan_enc}"], "NaN"),
    ("misspelt attack", ["attack", "--attack", "l4a-bse", "--eps", "16/255", "--out", "{tmp}/p.pt"], "did you mean"),
    (
        "attack layer that does not exist",
        ["attack", "--encoder", "random:demo", "--attack", "l4a-base", "--eps", "16/255", "--set", "layer=layer9"]
        + ["--out", "{tmp}/p.pt"],
        "available: ",
    ),
    (
        "patch place that does not exist",
        ["attack", "--encoder", "random:demo", "--attack", "advencoder-patch", "--eps", "16/255"]
        + ["--set", "location=centre", "--out", "{tmp}/p.pt"],
        "did you mean 'center'",
    ),
    (
        "attack option that does not exist",
        ["attack", "--encoder", "random:demo", "--attack", "l4a-base", "--eps", "16/255", "--set", "stepz=1"]
        + ["--out", "{tmp}/p.pt"],
        "has no option",
    ),
    ("ε = 0", FT + ["--method", "at", "--eps", "0"], "outside (0, 1]"),
    ("ε < 0", FT + ["--method", "at", "--eps", "-0.1"], "outside (0, 1]"),
    (
        "ε > 1",
        ["attack", "--encoder", "random:demo", "--attack", "l4a-base", "--eps", "2", "--out", "{tmp}/p"],
        "(0, 1]",
    ),
    ("ε not a number", ["attack", "--attack", "l4a-base", "--eps", "big", "--out", "{tmp}/p.pt"], "as a number"),
    ("batch size 0", FT + ["--method", "sft", "--batch-size", "0"], "batch size must be positive"),
    ("epochs < 0", FT + ["--method", "sft", "--epochs", "-1"], "epochs"),
    ("stage-2 k larger than the number of layers", FT + ["--method", "genaf", "--set", "stage2_k=1000"], "layers"),
    ("method option that does not exist", FT + ["--method", "genaf", "--set", "lamda=1"], "did you mean 'lam'"),
    ("method option of the wrong type", FT + ["--method", "genaf", "--set", "lam=abc"], "must be a number"),
    ("YAML config with an unknown key", FT + ["--config", "{yaml}"], "did you mean 'method'"),
    ("YAML config with an unknown nested key", FT + ["--config", "{yaml_sub}"], "did you mean 'n_train'"),
    ("YAML config that does not parse", FT + ["--config", "{bad_yaml}"], "not valid YAML"),
    ("YAML config file missing", FT + ["--config", "{tmp}/none.yaml"], "does not exist"),
    ("image folder without train/ and test/", FT + ["--dataset", "imagefolder:{tmp}/nothing"], "train/ and test/"),
    ("image folder with no images", FT + ["--dataset", "imagefolder:{empty}"], "no class folders"),
    ("image folder with an unreadable image", FT + ["--dataset", "imagefolder:{unreadable}"], "cannot read image"),
    ("image size 0", FT + ["--method", "sft", "--image-size", "0"], "image size"),
    ("split larger than the dataset", FT0 + ["--n-train", "100000"], "is more than the"),
    ("empty split", FT0 + ["--n-test", "0"], "must be positive"),
    ("run directory missing", ["evaluate", "--model", "{tmp}/nothing"], "not a genaf run directory"),
    ("perturbation file missing", EV + ["{tmp}/none.pt"], "does not exist"),
    ("perturbation file corrupt", EV + ["{corrupt}"], "not a readable perturbation file"),
    ("perturbation file truncated", EV + ["{truncated}"], "not a readable perturbation file"),
    ("perturbation file of another kind (encoder weights)", EV + ["{other_kind}"], "not a genaf perturbation"),
    ("perturbation with NaN values", EV + ["{nan}"], "NaN"),
    ("perturbation of another resolution", EV + ["{big}"], "32x32"),
    ("perturbation with 2 channels on RGB images", EV + ["{two}"], "2 channels"),
    (
        "labels out of the model's range",
        ["evaluate", "--model", "{run}", "--dataset", "imagefolder:{twelve}", "--out", "{tmp}/twelve.json"],
        "classes",
    ),
    ("per-sample attack asked to craft a universal one", ["attack", "--attack", "ssp", "--eps", "8/255"], "per-sample"),
    (
        "another dataset's numbers into the run's record",
        ["evaluate", "--model", "{run}", "--dataset", "imagefolder:{twelve}"],
        "--out FILE",
    ),
    ("data root asked for but empty", FT0 + ["--data-root", "{tmp}"], "was asked for"),
]


def _fill(args: list[str], f: dict) -> list[str]:
    out = []
    for a in args:
        for k, v in f.items():
            a = a.replace("{" + k + "}", str(v))
        out.append(a)
    return out


def test_bad_inputs_fail_cleanly_and_table_is_written(files, capsys):
    rows, failures = [], []
    for i, (what, argv, needle) in enumerate(CASES):
        argv = _fill([a.replace("{tmp}/r", f"{{tmp}}/run{i}") for a in argv], files)
        if argv[0] == "attack" and "--out" not in argv:
            argv += ["--out", str(files["tmp"] / "p.pt")]
        if argv[0] == "attack" and "--encoder" not in argv:
            argv += ["--encoder", "random:demo"]
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse rejects a malformed flag value itself
            code = exc.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        message = lines[-1] if lines else ""
        ok = code == 2 and len(lines) == 1 and needle in message and "Traceback" not in err
        if not ok:
            failures.append(f"{what}: exit {code}, stderr {err!r}")
        shown = " ".join(a.replace(str(files["tmp"]), "$TMP") for a in argv)
        rows.append((what, shown, code, message.replace(str(files["tmp"]), "$TMP"), ok))
    _write_doc(rows)
    assert not failures, "\n".join(failures)


def test_grayscale_and_rgb_images_are_accepted_together(tmp_path):
    """Not an error on purpose: every image becomes RGB (grayscale replicated to 3 channels)."""
    from genaf.data import load_dataset

    root = _folder(tmp_path / "mixed", 2, per_class=4)
    _png(root / "train" / "c00" / "gray.png", mode="L")
    _png(root / "train" / "c01" / "big.png", size=12)
    dm = load_dataset(f"imagefolder:{root}", image_size=8, n_train=6, n_val=3, seed=0)
    imgs = torch.cat([dm.train.images, dm.val.images])
    assert imgs.shape[1:] == (3, 8, 8)
    assert bool((imgs[:, 0] == imgs[:, 1]).all())  # the gray (and flat grey) images are replicated


def _write_doc(rows) -> None:
    lines = [
        "# Reliability: bad input, untrusted files, crashes, honest evaluations",
        "",
        "<!-- generated by tests/test_reliability_table.py; do not edit by hand -->",
        "",
        "## Bad input",
        "",
        "Every row was run by `pytest tests/test_reliability_table.py`, which regenerates this",
        "file. Each ends with a one-line error and exit code 2 (`--debug` shows the traceback);",
        "none hangs and none returns a result.",
        "",
        "| bad input | command | exit | message |",
        "|---|---|---|---|",
    ]
    for what, cmd, code, msg, ok in rows:
        msg = msg.replace("|", "\\|")
        lines.append(f"| {what} | `genaf {cmd}` | {code}{'' if ok else ' **(unexpected)**'} | {msg} |")
    lines += [
        "",
        "Accepted on purpose (not errors): an image folder mixing grayscale and RGB images, or images "
        "of several sizes — every image becomes RGB (grayscale replicated) and is resized to "
        "`--image-size` (`test_grayscale_and_rgb_images_are_accepted_together`); grayscale datasets "
        "such as Fashion-MNIST are replicated to 3 channels the same way.",
        "",
        "## Untrusted files",
        "",
        "Checkpoints, encoders, models and perturbations are read with safetensors, "
        "`torch.load(weights_only=True)` or a restricted unpickler that rebuilds tensors and plain "
        "containers only (`genaf.encoders.safe_load`); YAML with `yaml.safe_load`. "
        "`tests/test_untrusted_files.py` feeds pickles whose unpickling would create a file "
        "(through `os.system`, `exec`, `eval`, `subprocess`, `functools.partial`; nested in a state "
        "dict; as a plain pickle and inside a torch zip file) to every loader and checks that each is "
        "refused with a clear message and that the file is never created.",
        "",
        "## Crashes",
        "",
        "Checkpoints and result files are written to a temporary file and renamed into place. "
        "`tests/test_kill_resume.py` kills `genaf finetune` with `kill -9` in stage 1 and in stage 2, "
        "resumes it with `--resume`, and checks the final metrics equal an uninterrupted run's. "
        "Ctrl-C writes a checkpoint before exiting. `tests/test_full_disk.py` makes every write "
        "fail half-way (as on a full disk) and checks the previous checkpoint is intact.",
        "",
        "## Evaluations that cannot lie",
        "",
        "`metrics.json` holds `checks` (see `genaf.checks`): finite deterministic logits; the first "
        "evaluated perturbed batch of each entry equals an independent clamp(x + δ), stays in [0, 1] and "
        "within ε and differs from the clean images; the model does not answer nearly one class; a "
        "perturbation crafted from the run's own dataset shares no index with its train/val splits; the "
        "PGD loss rises; robust accuracy does not rise with ε by more than 1 point; white-box robust "
        "accuracy is not above transfer robust accuracy by more than noise. A failed check prints a "
        "warning in the CLI and is flagged in reports. `tests/test_checks.py` and `tests/test_honesty.py` "
        "show each check firing on a deliberately broken model or record (softmax outputs, dropout left "
        "on, input quantisation that masks gradients, an input-magnitude gate, a misapplied perturbation, "
        "a one-class model, surrogates taken from the training split).",
        "",
    ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(DOC)
