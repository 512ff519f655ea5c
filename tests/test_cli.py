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


def test_attack_then_evaluate_adds_every_entry(tmp_path, capsys, one_thread):
    """`genaf attack` then `genaf evaluate --perturbation P --autoattack apgd` on a tiny run: one
    entry per perturbation and one for AutoAttack (its version and per-attack counts) in metrics.json."""
    import json
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eval:\n  whitebox: {autoattack_steps: 4, autoattack_queries: 10}\n")
    run_dir = tmp_path / "run"
    tiny = ["--n-train", "64", "--n-val", "32", "--n-test", "40", "--epochs", "1", "--device", "cpu"]
    assert (
        main(
            ["finetune", "--encoder", "random:demo", "--method", "sft", "--config", str(cfg), "--out", str(run_dir)]
            + tiny
        )
        == 0
    )
    pert = tmp_path / "patch.safetensors"
    craft = ["attack", "--encoder", "demo", "--attack", "advencoder-patch", "--eps", "16/255"]
    craft += ["--n-surrogate", "40", "--set", "iterations=2", "--set", "location_candidates=top-left,center"]
    assert main(craft + ["--out", str(pert), "--device", "cpu"]) == 0
    ev = ["evaluate", "--model", str(run_dir), "--perturbation", str(pert), "--autoattack", "apgd", "--device", "cpu"]
    assert main(ev) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["attacks"]["patch"]["kind"] == "patch" and 0 <= m["robust_acc"]["patch"] <= 1
    aa = m["attacks"]["autoattack-wb"]
    assert aa["version"] == "apgd" and aa["steps"] == 4 and list(aa["per_attack"])[0] == "apgd-ce"
    assert set(aa["per_attack"]) <= {"apgd-ce", "apgd-t"}
    assert aa["per_attack"]["apgd-ce"]["attacked"] == round(m["clean_acc"] * m["n_test"])
    assert m["robust_acc"]["autoattack-wb"] <= m["clean_acc"]
    with pytest.raises(SystemExit) as bad:
        main(ev[:-3] + ["--autoattack", "strong"])
    assert bad.value.code == 2 and "invalid choice: 'strong'" in capsys.readouterr().err
    # another perturbation of the same name, evaluated in a later call: refused, the first entry kept
    other = tmp_path / "other" / "patch.safetensors"
    other.parent.mkdir()
    assert main(craft + ["--out", str(other), "--device", "cpu", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run_dir), "--perturbation", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "already holds an entry 'patch' measured with another perturbation (seed 0, now 1)" in err
    assert json.loads((run_dir / "metrics.json").read_text())["attacks"]["patch"]["seed"] == 0


def test_finetune_states_the_defaults_it_was_not_given(tmp_path, capsys):
    """A forgotten --dataset is said, not a silent Fashion-MNIST run (the run here stops at an
    unknown method option before any data is read; the line comes first)."""
    argv = ["finetune", "--encoder", "random:demo", "--set", "nosuch=1", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert "not given, so the defaults: --dataset fashion-mnist --method genaf" in cap.out
    assert "--encoder" not in cap.out.split("defaults:")[1].splitlines()[0]
    assert cap.err.count("\n") == 1 and "nosuch" in cap.err  # the error stays one line on stderr
