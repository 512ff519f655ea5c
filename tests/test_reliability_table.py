"""Every bad input we know of ends with a one-line error naming the problem and exit code 2.

Running this file writes docs/reliability/cli-inputs.json (the command-line cases below) and
regenerates docs/RELIABILITY.md from every fragment in docs/reliability/ (see tests/_reliability.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _reliability import BAD_INPUT, FAILED, REFUSED, assemble, one_line, section, write_fragment
from genaf.cli import main


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
    # perturbation files that lie about their budget (δ = 0.9 everywhere, at the run's 28x28)
    big = torch.full((1, 1, 28, 28), 0.9)
    for name, eps in (("eps0", 0.0), ("epsneg", -1.0), ("epsnan", float("nan")), ("eps50", 50.0), ("eps16", 16 / 255)):
        f[name] = t / f"{name}.pt"
        save_file({"delta": big}, str(f[name]), metadata={"genaf_perturbation": json.dumps({"eps": eps})})
    f["fullpatch"] = t / "fullpatch.pt"
    meta = {"genaf_perturbation": json.dumps({"kind": "patch", "eps": 1.0})}
    save_file({"delta": torch.rand(1, 3, 28, 28), "mask": torch.ones(1, 1, 28, 28)}, str(f["fullpatch"]), metadata=meta)
    # image folders with a float image: NaN pixels, values outside [0, 1]
    from PIL import Image

    for name, value in (("nanimg", float("nan")), ("hdrimg", 4.0)):
        root = _folder(t / name, 2)
        arr = np.full((8, 8), 0.5, dtype=np.float32)
        arr[0, 0] = value
        Image.fromarray(arr, mode="F").save(root / "test" / "c00" / "float.tiff")
        f[name] = root
    return f


# tiny splits and one epoch: should a check come late, the case still ends in seconds
FT0 = ["finetune", "--encoder", "random:demo", "--out", "{tmp}/r"]
FT = FT0 + ["--n-train", "64", "--n-val", "32", "--n-test", "32", "--epochs", "1"]  # later flags win
FTF = FT0 + ["--n-val", "1", "--epochs", "1"]  # a tiny image folder: every image in a split
EV = ["evaluate", "--model", "{run}", "--perturbation"]

# (what is wrong, argv, text the one-line error must contain[, section of RELIABILITY.md])
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
    ("image folder with an unreadable image", FTF + ["--dataset", "imagefolder:{unreadable}"], "cannot read image"),
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
    ("δ of 0.9 recorded as ε = 0", EV + ["{eps0}"], "outside (0, 1]", section(2)),
    ("δ of 0.9 recorded as ε = −1", EV + ["{epsneg}"], "outside (0, 1]", section(2)),
    ("δ of 0.9 recorded as ε = NaN", EV + ["{epsnan}"], "outside (0, 1]", section(2)),
    ("δ of 0.9 recorded as ε = 50", EV + ["{eps50}"], "outside (0, 1]", section(2)),
    ("δ of 0.9 recorded as ε = 16/255", EV + ["{eps16}"], "exceeds its recorded budget", section(2)),
    ("a 'patch' whose mask covers the whole image", EV + ["{fullpatch}"], "covers 100.0 %", section(2)),
    ("a float image with a NaN pixel", FTF + ["--dataset", "imagefolder:{nanimg}"], "non-finite", section(3)),
    ("a float image with values up to 4", FTF + ["--dataset", "imagefolder:{hdrimg}"], "in [0.5, 4]", section(3)),
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
    for i, (what, argv, needle, *sec) in enumerate(CASES):
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
        outcome = REFUSED if ok else FAILED
        msg = one_line(message, files["tmp"])
        rows.append(
            {
                "section": sec[0] if sec else BAD_INPUT,
                "input": f"{what}: `genaf {shown}`",
                "outcome": outcome,
                "message": msg if ok else f"exit {code}: {msg}",
            }
        )
    write_fragment("cli-inputs.json", rows)
    text = assemble(PROSE)
    assert not failures, "\n".join(failures)
    for r in rows:  # every case that ran is in the document
        assert r["message"].replace("|", "\\|") in text


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


PROSE = {
    BAD_INPUT: (
        "Command lines with a wrong name, a value out of range, a missing or malformed file: each ends with a "
        "one-line error and exit code 2; none hangs and none returns a result. Accepted on purpose (not "
        "errors): an image folder mixing grayscale and RGB images, or images of several sizes; every image "
        "becomes RGB (grayscale replicated) and is resized to `--image-size` "
        "(`test_grayscale_and_rgb_images_are_accepted_together`); grayscale datasets such as Fashion-MNIST "
        "are replicated to 3 channels the same way."
    ),
    section(1): (
        "Every reader checks what a file *claims* (tensor bytes, widths, class counts, image pixels) against "
        "the limits of `genaf.limits` before allocating; `--limit NAME=VALUE` or `GENAF_LIMIT_<NAME>` raises a "
        "limit for a file you trust. Images: width x height is read from the header and checked against "
        "`max_image_pixels` (default 64,000,000) before decoding; `--image-size` against `max_image_size` "
        "(default 1024). Only the images a split uses are decoded and resized, one at a time (an image "
        "folder's files are opened when a split needs them; the surrogate reserve is resized when first read, "
        "and `surrogate(n)` resizes its first n only). The memory cases run in a subprocess with "
        "`RLIMIT_DATA` far below the machine's memory and must end with exit 2 and one line."
    ),
    section(2): (
        "A perturbation file (safetensors plus a JSON header) is refused on load unless its ε is a finite "
        "number in (0, 1] and ‖δ‖∞ ≤ ε up to float rounding (1e-6 plus the machine epsilon of δ's stored "
        "dtype times ε, so a δ clamped to ε and saved in half precision still loads); `save` refuses the same. "
        "`Perturbation.apply` clamps δ to [−ε, ε] and the result to [0, 1] whatever δ holds (before, ε ≤ 0 "
        "meant no clamp at all). A patch records ε = 1 (inside its mask a pixel may take any value; its "
        "budget is the mask's area) and may cover at most 50 % of the image: a larger 'patch' is refused as "
        "what it is, a full-image perturbation with budget ε = 1 (real patch attacks cover a few per cent: "
        "AdvEncoder-PAT 3 %, the adversarial-patch literature up to about 25 %); `advencoder-patch` refuses "
        "`patch_fraction` above 0.5."
    ),
    section(3): (
        "Each PIL mode is decoded by its real range: 8-bit modes (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr) "
        "/255 with transparency flattened onto white; 16-bit (I;16) /65535; 32-bit integer (I) as 16-bit "
        "(Pillow gives mode I to 16-bit PNG, PGM and TIFF files), values outside [0, 65535] refused with the "
        "range found; float (F: PFM, float TIFF) taken as is when it lies in [0, 1], refused with the range "
        "found otherwise; non-finite pixels refused with the file named. Other modes are refused by name."
    ),
    section(4): (
        "Every config path (finetune `--config`, bench files, `--set` values, a run's config.yaml): alias "
        "bombs and recursive aliases refused, bounded size, nodes and depth, unknown keys at any depth an "
        "error with a suggestion, types checked, binary files refused; one line, exit 2."
    ),
    section(5): (
        "Checkpoints and result files are written to a temporary file and renamed into place. "
        "`genaf finetune` killed with `kill -9` or Ctrl-C mid-epoch in stage 1 and in stage 2 resumes with "
        "`--resume` from the last completed epoch and ends with the same metrics as an uninterrupted run."
    ),
    section(6): "A `--resume` whose options differ from the saved run is refused and the differences listed.",
    section(7): (
        "A second `genaf finetune` on a run folder in use is refused (one lock per run folder); an `--out` "
        "that is a file or another program's folder is refused before any work."
    ),
    section(8): (
        "A full disk during a checkpoint write (torch raises `RuntimeError`, tested with a file-size limit and "
        "a 64 KiB tmpfs) gives the disk-full message and leaves the previous checkpoint intact; read-only "
        "`--out`, 0-byte checkpoints and configs, non-positive or NaN learning rates, seeds outside 64 bits, "
        "NaN normalisation and hand-edited results.json end in one line."
    ),
    "Untrusted files": (
        "Checkpoints, encoders, models and perturbations are read with safetensors, "
        "`torch.load(weights_only=True)` or a restricted unpickler that rebuilds tensors and plain "
        "containers only (`genaf.encoders.safe_load`); YAML with a bounded safe loader. "
        "`tests/test_untrusted_files.py` feeds pickles whose unpickling would create a file (through "
        "`os.system`, `exec`, `eval`, `subprocess`, `functools.partial`; nested in a state dict; as a plain "
        "pickle and inside a torch zip file) to every loader and checks that each is refused with a clear "
        "message and that the file is never created."
    ),
    "Evaluations that cannot lie": (
        "`metrics.json` holds `checks` (see `genaf.checks`): finite deterministic logits; the first evaluated "
        "perturbed batch of each entry equals an independent clamp(x + δ), stays in [0, 1] and within ε and "
        "differs from the clean images; the model does not answer nearly one class; a perturbation crafted "
        "from the run's own dataset shares no index with its train/val splits; the PGD loss rises; robust "
        "accuracy does not rise with ε by more than 1 point; white-box robust accuracy is not above transfer "
        "robust accuracy by more than noise. A failed check prints a warning in the CLI and is flagged in "
        "reports. `tests/test_checks.py` and `tests/test_honesty.py` show each check firing on a deliberately "
        "broken model or record (softmax outputs, dropout left on, input quantisation that masks gradients, "
        "an input-magnitude gate, a misapplied perturbation, a one-class model, surrogates taken from the "
        "training split)."
    ),
}
