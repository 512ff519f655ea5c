"""Ordinary faults and mistakes end in one line and exit 2 (or are refused before any work):
resume with other options, two runs on one folder, odd --out, empty files, bad numbers,
hand-edited results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _reliability import recorder, section
from _tiny import shared_tiny_resnet
from genaf.api import run_lock

_record = recorder(
    "faults.json",
    lambda n: section(6) if "resume_with_other" in n else section(7) if "folder_in_use" in n else section(8),
)

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed")
# the demo ResNet at width 4 (random weights): the faults are the subject, not the encoder
SMALL = ["--encoder", shared_tiny_resnet(), "--n-train", "64", "--n-val", "32", "--n-test", "32", "--epochs", "1"]
SMALL += ["--method", "sft", "--batch-size", "32", "--set", "epochs=1"]


def _cli(*args, env=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "genaf", *map(str, args)], capture_output=True, text=True, env=e)


def _one_line(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("genaf: WARNING")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run folder as an interrupted fine-tune leaves it: config.yaml and a checkpoint."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path_factory.mktemp("faults") / "run"
    r = _cli("finetune", *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps no checkpoint
    torch.save({"format": "genaf-checkpoint"}, out / "checkpoint.pt")  # pretend it stopped
    (out / "metrics.json").unlink()
    return out


@needs_fashion
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--seed", "3"], "seed: saved 0, now 3"),
        (["--set", "encoder_lr=0.01"], "method_config.encoder_lr: saved 0.0001, now 0.01"),
        (["--n-train", "60"], "data.n_train: saved 64, now 60"),
    ],
)
def test_resume_with_other_options_is_refused_and_lists_them(interrupted_run, extra, needle):
    before = (interrupted_run / "config.yaml").read_text()
    line = _one_line(_cli("finetune", *SMALL, *extra, "--out", interrupted_run, "--resume"))
    assert "--resume: the options differ" in line and needle in line, line
    assert (interrupted_run / "config.yaml").read_text() == before


@needs_fashion
def test_a_second_finetune_on_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    held = run_lock(out)  # as a running genaf finetune holds it
    try:
        line = _one_line(_cli("finetune", *SMALL, "--out", out))
        assert "another genaf is writing into" in line
    finally:
        held.close()


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.write_text("x"), "is an existing file"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "with other files in it"),
    ],
)
def test_out_that_is_a_file_or_a_foreign_folder(tmp_path, make, needle):
    out = tmp_path / "out"
    make(out)
    assert needle in _one_line(_cli("finetune", *SMALL, "--out", out))


def test_out_that_cannot_be_written(tmp_path):
    assert "cannot be created" in _one_line(_cli("finetune", *SMALL, "--out", "/proc/genaf-run"))


def test_finished_run_and_empty_checkpoint_on_resume(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    line = _one_line(_cli("finetune", *SMALL, "--out", run, "--resume"))
    assert "cannot read" in line and "checkpoint.pt" in line
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.json").write_text("{}")
    (done / "config.yaml").write_text("seed: 0\n")
    assert "holds a finished run" in _one_line(_cli("finetune", *SMALL, "--out", done, "--resume"))


def test_empty_config_yaml_of_a_run(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("")
    assert "empty or not a genaf run configuration" in _one_line(_cli("evaluate", "--model", run))


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "encoder_lr=-1e-4"], "learning rates must be positive"),
        (["--set", "head_lr=nan"], "options must be finite"),
        (["--seed", str(2**70)], "seed must be a whole number in [0, 2^63)"),
    ],
)
def test_bad_numbers(tmp_path, extra, needle):
    assert needle in _one_line(_cli("finetune", *SMALL, *extra, "--out", tmp_path / "r"))


def test_nan_normalisation_in_args_json(tmp_path):
    from genaf.encoders.resnet import build_backbone

    net = build_backbone({"arch": "resnet18", "width": 64, "stem": "cifar"})
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    (tmp_path / "args.json").write_text(
        json.dumps({"method": "simclr", "backbone": "resnet18", "mean": [float("nan")] * 3, "std": [0.2] * 3})
    )
    line = _one_line(_cli("inspect", f"solo:{ckpt}"))
    assert "must be finite" in line


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"encoder": "demo"}], "lacks the column"),
        (["oops"], "is not a mapping"),
        (
            [
                {
                    "encoder": "e",
                    "dataset": "d",
                    "method": "m",
                    "setting": "dae",
                    "attack": "a",
                    "eps": 0.1,
                    "seed": 0,
                    "clean_acc": "high",
                    "robust_acc": 0.5,
                }
            ],
            "clean_acc must be a number",
        ),
        (
            [
                {
                    "encoder": "e",
                    "dataset": "d",
                    "method": "m",
                    "setting": "dae",
                    "attack": "a",
                    "eps": 0.1,
                    "seed": 0,
                    "clean_acc": 7.0,
                    "robust_acc": 0.5,
                }
            ],
            "is not an accuracy",
        ),
    ],
)
def test_hand_edited_results_for_report(tmp_path, rows, needle):
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    assert needle in _one_line(_cli("report", tmp_path))
