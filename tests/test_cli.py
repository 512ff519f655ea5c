"""Bad input ends with a one-line error naming the problem, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from genaf.cli import main


def run(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["inspect", "nosuch:thing"], "unknown encoder spec scheme 'nosuch'"),
        (["inspect", "file:/does/not/exist.pt"], "does not exist"),
        (["inspect", "solo:/does/not/exist.ckpt"], "exist"),
        (["inspect", "torchvision:resnet18"], "torchvision:ARCH:PATH"),
        (
            ["finetune", "--encoder", "random:demo", "--dataset", "fasion-mnist", "--out", "{tmp}/r"],
            "did you mean 'fashion-mnist'",
        ),
        (
            ["finetune", "--encoder", "random:demo", "--dataset", "imagefolder:{tmp}/empty", "--out", "{tmp}/r"],
            "train/ and test/",
        ),
        (
            ["finetune", "--encoder", "random:demo", "--method", "at", "--eps", "1.5", "--out", "{tmp}/r"],
            "outside (0, 1]",
        ),
        (
            ["finetune", "--encoder", "random:demo", "--method", "at", "--eps", "0", "--out", "{tmp}/r"],
            "outside (0, 1]",
        ),
        (["finetune", "--encoder", "random:demo", "--method", "gen-af", "--out", "{tmp}/r"], "unknown method"),
        (["attack", "--encoder", "random:demo", "--attack", "l4a-base", "--eps", "2", "--out", "{tmp}/p.pt"], "(0, 1]"),
        (
            ["attack", "--encoder", "random:demo", "--attack", "l4a", "--eps", "16/255", "--out", "{tmp}/p.pt"],
            "unknown attack",
        ),
        (["evaluate", "--model", "{tmp}/nothing"], "not a genaf run directory"),
        (
            [
                "attack",
                "--encoder",
                "random:demo",
                "--attack",
                "embedding-pgd",
                "--eps",
                "8/255",
                "--out",
                "{tmp}/p.pt",
            ],
            "per-sample",
        ),
    ],
)
def test_bad_input_exit_2(capsys, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, err = run(capsys, *args)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_subprocess_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "genaf", "inspect", str(tmp_path / "x.ckpt")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_inspect_prints_stem(capsys):
    assert main(["inspect", "random:demo"]) == 0
    out = capsys.readouterr().out
    assert "feature_dim" in out and "padding" in out and "resnet18" in out
