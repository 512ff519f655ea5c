"""`genaf finetune` killed with SIGKILL mid-run and restarted with --resume ends with the same
metrics as an uninterrupted run (CPU, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _reliability import recorder, section
from _tiny import tiny_resnet

_record = recorder("kill-resume.json", section(5), "resumed exactly")

ARGS = [
    "finetune",
    "--dataset",
    "fashion-mnist",
    "--method",
    "genaf",
    "--n-train",
    "256",
    "--n-val",
    "96",
    "--n-test",
    "96",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--epochs",
    "3",
    "--set",
    "attack_steps=2",
    "--set",
    "warmup_epochs=0",
    "--set",
    "stage2_epochs=3",
    "--set",
    "probe_size=32",
    "--set",
    "sensitivity_steps=2",
]


def _cmd(encoder, out, *extra):
    return [sys.executable, "-m", "genaf", *ARGS, "--encoder", encoder, "--out", str(out), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run, and its encoder: the demo ResNet-18 at width 4 with seeded random
    weights (resuming is the subject, not the encoder; width 16 made each test 3x slower)."""
    encoder = tiny_resnet(tmp_path_factory.mktemp("encoder"))
    ref = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_cmd(encoder, ref), check=True, capture_output=True, env=_env(), timeout=600)
    return encoder, ref


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, sig",
    [("stage1", signal.SIGKILL), ("stage2", signal.SIGKILL), ("stage1", signal.SIGINT), ("stage2", signal.SIGINT)],
)
def test_kill_then_resume_matches_uninterrupted(tmp_path, tiny_data, uninterrupted, stage, sig):
    """SIGKILL, or Ctrl-C (SIGINT) in the middle of an epoch: --resume gives bit-identical metrics
    and predictions (a Ctrl-C keeps the checkpoint of the last completed epoch)."""
    encoder, ref = uninterrupted
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(encoder, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True
    )
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    # wait until the stage has written at least one epoch checkpoint, then kill without warning
    while time.time() < deadline:
        if ckpt.is_file():
            try:
                state = torch.load(ckpt, weights_only=True)
                if state["stage"] == stage and state["epoch"] >= 1:
                    break
            except Exception:  # being replaced right now; the rename is atomic, so retry
                pass
        time.sleep(0.05)
    if sig == signal.SIGINT:
        time.sleep(0.3)  # into the next epoch's batches (or the stage's setup)
    proc.send_signal(sig)
    _, err = proc.communicate()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    subprocess.run(_cmd(encoder, killed, "--resume"), check=True, capture_output=True, env=_env(), timeout=600)
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["clean_acc"] == b["clean_acc"] and a["robust_acc"] == b["robust_acc"]
    assert (ref / "predictions.json").read_text() == (killed / "predictions.json").read_text()
    assert a["budget"]["encoder_passes_per_train_image"] == b["budget"]["encoder_passes_per_train_image"]
    assert (
        json.loads((ref / "sensitivity.json").read_text())["selected"]
        == json.loads((killed / "sensitivity.json").read_text())["selected"]
    )
