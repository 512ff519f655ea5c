"""``genaf bench`` / ``genaf report``: the experiment-matrix runner, its resumability after
``kill -9``, the shipped configurations, and the report's statistics and flags."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _tiny import TINY_RESNET, shared_tiny_resnet, write_encoder
from genaf.bench import COLUMNS, KEY_COLUMNS, load_config, run_bench
from genaf.bench_report import build_report, front_area, pareto_front
from genaf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# the benches' encoder: the demo ResNet-18 at width 4 with seeded random weights, written once per
# test process (the bench's plumbing is the subject here, not the encoder; width 16 was 3x slower)
TINY_ENCODER = shared_tiny_resnet()
TINY = {
    "name": "tiny bench",
    "device": "cpu",
    "encoders": {"tiny-resnet": TINY_ENCODER},
    "datasets": [{"name": "fashion-mnist", "n_train": 64, "n_val": 32, "n_test": 64}],
    "surrogate": {"n": 64},
    "method_defaults": {"epochs": 1, "attack_steps": 1, "warmup_epochs": 0},
    "methods": {"sft": {}, "genaf": {"stage2_epochs": 1, "probe_size": 16, "sensitivity_steps": 1}},
    "attacks": {"uniform-noise": {}, "l4a-base": {"iterations": 4}, "ssp": {"steps": 1}},
    "eps": ["16/255"],
    "seeds": [0, 1],
    "train": {"batch_size": 32, "n_val_robust": 16, "val_steps": 1},
    "eval": {"batch_size": 64},
    "whitebox": {"steps": 1, "fgsm": False},
    "fresh_head": {"epochs": 1},
    "selfattack": ["l4a-base"],
    "budget_controls": False,
}
N_ROWS = 2 * 2 * (3 + 1 + 3 + 1)  # methods × seeds × (dae + white-box + fresh-head + self-attack)


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _no_seconds(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def _csv_rows(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("bench")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
    out = root / "uninterrupted"
    res = run_bench(cfg, out, log=lambda *_: None)
    return cfg, out, res


def test_runner_writes_every_cell_and_a_report(reference):
    _cfg, out, res = reference
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == N_ROWS == len(res["rows"])
    keys = {tuple(r[k] for k in KEY_COLUMNS) for r in rows}
    assert len(keys) == N_ROWS
    settings = {r["setting"] for r in rows}
    assert settings == {"dae", "whitebox", "fresh-head", "self-attack"}
    assert {r["attack"] for r in rows if r["setting"] == "whitebox"} == {"pgd1-wb"}
    for r in rows:
        assert 0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["robust_acc"] <= 1.0 and 0.0 <= r["fooling_rate"] <= 1.0
        # every row also holds the validation numbers the report decides on, and the budget
        assert 0.0 <= r["val_clean_acc"] <= 1.0 and 0.0 <= r["val_robust_acc"] <= 1.0
        assert r["total_epochs"] >= 1 and r["passes_per_image"] > 0
        assert r["drift"] is not None and r["drift"] > 0
        assert (out / r["run"]).is_dir()
        if r["setting"] != "whitebox" and r["attack"] != "ssp":
            assert (out / r["perturbation"]).is_file()
    # the per-sample DAE (crafted per test and validation image on the original encoder, once for
    # every method) has its rows and its cache
    ssp = [r for r in rows if r["attack"] == "ssp"]
    assert {r["setting"] for r in ssp} == {"dae", "fresh-head"} and all(r["craft_seconds"] > 0 for r in ssp)
    assert len(list((out / "per-sample").rglob("*.safetensors"))) == 2 * 2  # seeds × {test, val}
    report = (out / "report.md").read_text()
    assert "Every decision of this report" in report and "Decided on the validation split" in report
    assert "Training budget" in report
    # uniform noise at the same budget is a perturbation too; its ε is the grid's
    assert {round(255 * r["eps"]) for r in rows if r["setting"] == "dae"} == {16}
    # canonical order: the configuration's order, seeds innermost
    order = [(r["method"], r["setting"], r["attack"], r["seed"]) for r in rows[:4]]
    assert order == [("sft", "dae", "uniform-noise", 0), ("sft", "dae", "uniform-noise", 1)] + [
        ("sft", "dae", "l4a-base", 0),
        ("sft", "dae", "l4a-base", 1),
    ]
    csv_rows = _csv_rows(out / "results.csv")
    assert list(csv_rows[0]) == list(COLUMNS)
    assert [float(r["robust_acc"]) for r in csv_rows] == [r["robust_acc"] for r in rows]
    report = (out / "report.md").read_text()
    assert "tiny bench" in report and "mean DAE RA" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert any("tradeoff" in x for x in links) and any("sensitivity" in x for x in links)
    assert any(x.endswith(".delta.png") for x in links) and any(x.endswith(".examples.png") for x in links)
    # the sensitivity chart holds both seeds; the perturbations are drawn again on test images
    # with the fine-tuned SFT model's predictions
    assert "genaf (seeds 0, 1)" in report
    assert re.search(r"l4a-base, ε 16/255, crafted on \S+ — test images of \S+, predictions of sft \(seed 0\)", report)
    for link in links:
        assert (out / link).is_file(), link
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run with the same config computes nothing
    again = run_bench(out / "bench.yaml", out, log=lambda *_: None)
    assert again["computed"] == 0 and _no_seconds(again["rows"]) == _no_seconds(rows)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_then_rerun_gives_the_uninterrupted_results(reference, tmp_path, sig):
    """kill -9, or Ctrl-C in the middle of a fine-tune: the rerun gives the same rows."""
    cfg, ref, _ = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "genaf", "bench", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True)
    deadline = time.time() + 300
    killed_mid_finetune = False
    try:
        while time.time() < deadline and proc.poll() is None:
            # mid fine-tune: an epoch checkpoint is on disk but the run has no metrics yet
            if any(not (p.parent / "metrics.json").exists() for p in (out / "runs").rglob("checkpoint.pt")):
                killed_mid_finetune = True
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate()
    assert killed_mid_finetune, "the bench finished (or stalled) before it could be killed mid fine-tune"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in err, err
    done = json.loads((out / "results.json").read_text())["rows"] if (out / "results.json").exists() else []
    assert len(done) < N_ROWS
    subprocess.run(cmd, check=True, capture_output=True, env=_env(), timeout=600)
    a, b = _csv_rows(ref / "results.csv"), _csv_rows(out / "results.csv")
    assert _no_seconds(a) == _no_seconds(b)
    ja = json.loads((ref / "results.json").read_text())["rows"]
    jb = json.loads((out / "results.json").read_text())["rows"]
    assert _no_seconds(ja) == _no_seconds(jb)


@pytest.mark.slow
def test_two_shards_in_one_folder_merge_to_the_unsharded_results(reference, tmp_path):
    """`genaf bench --shard 0/2` and `--shard 1/2` run at the same time into one folder (they share
    perturbations and per-sample DAE images, made once under a file lock); `genaf report` merges
    their files into the same results as one unsharded run (apart from the *_seconds columns)."""
    cfg, ref, _ = reference
    out = tmp_path / "sharded"
    cmds = [[sys.executable, "-m", "genaf", "bench", str(cfg), "--out", str(out), "--shard", f"{i}/2"] for i in (0, 1)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True) for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    shard_rows = [json.loads((out / "shards" / f"{i}-of-2.json").read_text())["rows"] for i in (0, 1)]
    keys = [{tuple(r[k] for k in KEY_COLUMNS) for r in rows} for rows in shard_rows]
    assert keys[0] and keys[1] and not keys[0] & keys[1], "the shards computed overlapping cells"
    assert len(keys[0]) + len(keys[1]) == N_ROWS
    # each perturbation was crafted by one shard only: one "crafting" line per file in both logs
    crafted = [ln for o, e in outs for ln in (o + e).splitlines() if "bench: crafting " in ln and "->" in ln]
    assert len(crafted) == len(set(crafted)) == len(list((out / "perturbations").rglob("*.safetensors")))
    for o, _ in outs:
        if " result rows in " in o:  # the shard that finished last merged: it counts every shard's rows
            assert f"{N_ROWS} result rows in " in o, o
    r = subprocess.run(
        [sys.executable, "-m", "genaf", "report", str(out)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert r.returncode == 0, r.stderr
    a, b = _csv_rows(ref / "results.csv"), _csv_rows(out / "results.csv")
    assert _no_seconds(a) == _no_seconds(b)
    assert (out / "report.md").is_file()


def test_a_shard_makes_the_inputs_no_other_shard_is_making_before_it_waits(tmp_path):
    """Before waiting on another shard's lock, a shard crafts every shared input of the unit that
    is missing and unlocked, starting at its own place in the list (shard 1 of 2 at the middle):
    two shards reaching a seed together craft its perturbations side by side."""
    import fcntl

    from genaf.bench import Bench, _eps_tag

    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    cfg = {
        **TINY,
        "attacks": {"uniform-noise": {}, "l4a-base": {"iterations": 2}, "fff": {"iterations": 2}, "ssp": {"steps": 1}},
        "seeds": [0],
    }
    b = Bench(load_config(cfg), tmp_path, log=lambda *_: None, shard=(1, 2))
    enc, ds, m = "tiny-resnet", b.cfg.datasets[0], b.cfg.methods[0]
    cells = [c for c in b.unit_cells(enc, ds, m, 0).values() if c["setting"] == "dae"]
    order = list(dict.fromkeys(f"{c['spec'].label}@{_eps_tag(c['eps'])}" for c in cells))
    assert len(order) == 4
    spec = {c["spec"].label: c["spec"] for c in cells}
    held = b.pert_path(enc, spec["l4a-base"], cells[0]["eps"], 0)
    held.parent.mkdir(parents=True, exist_ok=True)
    with open(held.parent / f".{held.name}.lock", "w") as fh:  # "another shard" crafts l4a-base now
        fcntl.flock(fh, fcntl.LOCK_EX)
        made = b.claim_inputs(enc, ds, cells, 0, b.data(ds, 0))
        assert not held.is_file()
    rotated = order[2:] + order[:2]
    assert made == [x for x in rotated if not x.startswith("l4a-base@")]
    for label in ("uniform-noise", "fff"):
        assert b.pert_path(enc, spec[label], cells[0]["eps"], 0).is_file()
    stem = b.per_sample_stem(enc, ds, spec["ssp"], cells[0]["eps"], 0)
    assert all(stem.with_name(f"{stem.name}-{s}.safetensors").is_file() for s in ("test", "val"))
    # the lock released, the one input left is made, and then there is nothing left to make
    assert b.claim_inputs(enc, ds, cells, 0, b.data(ds, 0)) == [x for x in order if x.startswith("l4a-base@")]
    assert held.is_file()
    assert b.claim_inputs(enc, ds, cells, 0, b.data(ds, 0)) == []


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_shard_spec_errors(bad):
    from genaf.bench import parse_shard

    with pytest.raises(ConfigError, match="--shard takes I/N"):
        parse_shard(bad)


def test_every_shipped_config_resolves_without_running():
    files = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "paper").glob("*.yaml"))
    names = {f.name for f in files}
    assert {"bench-small.yaml", "ablation-small.yaml"} <= names
    assert len(list((CONFIGS / "paper").glob("*.yaml"))) >= 1
    for f in files:
        cfg = load_config(f)  # encoders, datasets, methods + options, attacks + options: all checked
        assert cfg.methods and cfg.attacks and cfg.seeds, f
    small = load_config(CONFIGS / "bench-small.yaml")
    assert {m.method for m in small.methods} >= {
        "sft",
        "lp",
        "at",
        "trades",
        "mart",
        "fare",
        "rift",
        "genaf-stage1",
        "genaf",
    }
    assert any(m.method == "sft" and m.options.get("encoder_lr", 0) > 1e-4 for m in small.methods)
    assert {a.attack for a in small.attacks} >= {
        "l4a-base",
        "l4a-fuse",
        "l4a-ugs",
        "std",
        "sgd-uap",
        "fff",
        "ssp-universal",
        "uap",
        "advencoder",
        "uniform-noise",
    }
    paper = [load_config(f) for f in sorted((CONFIGS / "paper").glob("*.yaml"))]
    specs = " ".join(s for c in paper for _, s in c.encoders)
    for ssl in ("simclr", "byol", "mocov2plus", "mocov3", "dino", "barlow_twins", "swav", "nnclr", "vicreg", "ressl"):
        assert f"{ssl}" in specs
    datasets = {d.name.split(":")[0] for c in paper for d in c.datasets}
    assert {"cifar10", "stl10", "gtsrb", "svhn", "imagefolder"} <= datasets
    assert all(a.preset == "paper" for c in paper for a in c.attacks)
    # SFT and AT again at Gen-AF's total budget (warm-up 1 + 3 epochs + stage 2 2 = 6)
    controls = {m.label: m for m in small.methods if m.label in small.budget_controls}
    assert set(controls) == {"sft-budget", "at-budget"}
    assert controls["sft-budget"].resolved["epochs"] == 6
    assert controls["at-budget"].resolved["epochs"] + controls["at-budget"].resolved["warmup_epochs"] == 6


def test_configs_measured_before_the_default_changed_pin_the_weight_they_ran_with():
    """Gen-AF's default λ became 0 after these tables were measured at λ = 1e4: each config pins the
    weight (so rerunning it reproduces its table), and the configs not yet run use the default.
    (configs/bench-small.yaml runs today's defaults; docs/BENCH.md says its table ran with λ = 1e4.)"""
    from genaf.methods.genaf import GENAF_DEFAULTS

    assert GENAF_DEFAULTS["lam"] == 0.0
    for name in ("ablation-small.yaml", "bench-hard-vit-fmnist100.yaml"):
        lam = {m.label: m.resolved["lam"] for m in load_config(CONFIGS / name).methods if "lam" in m.resolved}
        assert lam["genaf"] == 1e4 and lam["genaf-stage1" if "genaf-stage1" in lam else "no-stage2"] == 1e4, name
    for name in ("bench-hard.yaml", "bench-hard-resnet-fmnist100.yaml"):
        lam = {m.label: m.resolved["lam"] for m in load_config(CONFIGS / name).methods if "lam" in m.resolved}
        assert lam == {"genaf": 0.0, "lam-1e4": 1e4, "genaf-stage1": 0.0}, (name, lam)


def test_budget_controls_can_be_named_or_switched_off():
    base = {**TINY, "methods": {"sft": {}, "at": {}, "genaf": {"stage2_epochs": 2}}}
    assert load_config({**base, "budget_controls": False}).budget_controls == []
    cfg = load_config({**base, "budget_controls": ["sft"]})
    assert cfg.budget_controls == ["sft-budget"]
    assert next(m for m in cfg.methods if m.label == "sft-budget").resolved["epochs"] == 0 + 1 + 2
    with pytest.raises(ConfigError, match="not method labels"):
        load_config({**base, "budget_controls": ["nope"]})


def test_a_budget_control_continues_its_run_and_gives_the_rows_of_one_from_scratch(tmp_path):
    """``sft-budget`` continues ``sft``'s finished run from its last epoch (the base run keeps it)
    instead of training the shared epochs again; its rows equal those of the same run named as a
    method of its own, which trains from scratch, and its training time counts both parts."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    base = {
        **TINY,
        "methods": {"sft": {}, "genaf": {"stage2_epochs": 1, "probe_size": 16, "sensitivity_steps": 1}},
        "attacks": {"uniform-noise": {}},
        "seeds": [0],
        "whitebox": None,
        "fresh_head": None,
        "selfattack": [],
    }
    got = {}
    for name, patch in {
        "continued": {"budget_controls": ["sft"]},
        "scratch": {
            "methods": {**base["methods"], "sft-budget": {"method": "sft", "epochs": 2}},
            "budget_controls": False,
        },
    }.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**base, **patch}, sort_keys=False))
        lines = []
        res = run_bench(cfg, tmp_path / name, log=lines.append)
        rows = [r for r in res["rows"] if r["method"] == "sft-budget"]
        assert len(rows) == 1 and rows[0]["total_epochs"] == 2
        metrics = json.loads((tmp_path / name / rows[0]["run"] / "metrics.json").read_text())
        got[name] = (rows[0], metrics, lines)
    (row, metrics, lines), (row0, metrics0, _) = got["continued"], got["scratch"]
    assert metrics["continued_from"]["epochs"] == 1 and "continued_from" not in metrics0
    assert any("bench: continuing runs/" in s and "sft-budget" in s for s in lines)
    assert metrics["budget"] == metrics0["budget"]  # the same passes per image: the whole run's
    for k in ("clean_acc", "robust_acc", "val_clean_acc", "val_robust_acc", "drift", "passes_per_image"):
        assert row[k] == row0[k], k
    own = metrics["train_seconds"]
    assert row["train_seconds"] == pytest.approx(own + metrics["continued_from"]["train_seconds"], abs=0.11)


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"method": {"sft": {}}}, "did you mean 'methods'"),
        ({"methods": {"sft": {"epoch": 1}}}, "did you mean 'epochs'"),
        ({"methods": {"sfft": {}}}, "did you mean 'sft'"),
        ({"attacks": {"l4a-base": {"iteration": 3}}}, "did you mean 'iterations'"),
        ({"attacks": {"ssp": {}}, "selfattack": ["ssp"]}, "per-sample attacks; a self-attack"),
        ({"encoders": ["solo"]}, "needs a path"),
        ({"datasets": ["fashion-mnst"]}, "did you mean 'fashion-mnist'"),
        ({"eps": ["16/0"]}, "cannot read"),
        ({"train": {"batchsize": 3}}, "did you mean 'batch_size'"),
    ],
)
def test_config_errors_name_the_problem(patch, needle):
    cfg = {**TINY, **patch}
    if "method" in patch:
        del cfg["methods"]
        cfg["methods"] = {"sft": {}}
        cfg["method"] = patch["method"]
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(cfg)


def _fake_rows():
    """Two seeds; 'greedy' beats genaf on both axes; 'at' has the best RA on l4a."""
    table = {  # method: (CA per seed, l4a RA per seed, ssp RA per seed, drift)
        "sft": ((0.90, 0.92), (0.10, 0.12), (0.20, 0.22), 0.01),
        "at": ((0.70, 0.72), (0.80, 0.84), (0.50, 0.52), 0.05),
        "genaf": ((0.80, 0.82), (0.60, 0.62), (0.55, 0.57), 0.03),
        "greedy": ((0.85, 0.87), (0.70, 0.72), (0.60, 0.62), 0.04),
    }
    rows = []
    for m, (ca, l4a, ssp, drift) in table.items():
        for attack, ra in (("l4a-base", l4a), ("ssp-universal", ssp)):
            for i, seed in enumerate((0, 1)):
                rows.append(
                    {
                        "encoder": "demo",
                        "dataset": "fashion-mnist",
                        "method": m,
                        "setting": "dae",
                        "attack": attack,
                        "eps": 16 / 255,
                        "seed": seed,
                        "clean_acc": ca[i],
                        "robust_acc": ra[i],
                        "fooling_rate": 0.1,
                        "drift": drift,
                        "method_name": m if m != "greedy" else "sft",
                        "attack_name": attack,
                    }
                )
    return rows


def test_report_from_hand_written_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"name": "fake", "rows": _fake_rows()}))
    path = build_report(tmp_path)
    text = path.read_text()
    table = text.split("### DAEs crafted")[1].split("Expected robustness")[0]
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln}
    # mean ± sample std over the two seeds, in percent
    assert "91.0 ± 1.4" in lines["sft"]  # CA of sft: (90, 92)
    assert "**91.0 ± 1.4**" in lines["sft"]  # the best clean accuracy is bold
    assert "**82.0 ± 2.8**" in lines["at"]  # the best RA on l4a-base: (80, 84)
    assert "**61.0 ± 1.4**" in lines["greedy"]  # the best RA on ssp-universal: (60, 62)
    assert "**" not in lines["genaf"]
    # mean DAE RA of greedy: seeds (0.70+0.60)/2, (0.72+0.62)/2 -> 66.0 ± 1.4; at: 65, 68 -> 66.5 ± 2.1
    assert "**66.5 ± 2.1**" in lines["at"] and "66.0 ± 1.4" in lines["greedy"]
    assert re.search(r"FLAG: greedy beats `genaf`", text)
    assert "not on the front" in text
    summary = json.loads((tmp_path / "report-summary.json").read_text())["demo/fashion-mnist/dae"]
    assert summary["dominating_genaf"] == ["greedy"]
    assert set(summary["front"]) == {"sft", "greedy", "at"}
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / link).is_file()
    # the command rebuilds it; a folder without results is one line, exit code 2
    from genaf.cli import main

    assert main(["report", str(tmp_path)]) == 0
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_front_and_area():
    pts = {"a": (90.0, 10.0), "b": (70.0, 80.0), "c": (60.0, 50.0), "d": (80.0, 60.0)}
    assert pareto_front(pts) == ["b", "d", "a"]
    # union of [0,90]x[0,10], [0,80]x[0,60], [0,70]x[0,80]
    assert front_area([pts[k] for k in "abd"]) == pytest.approx(90 * 10 + 80 * 50 + 70 * 20)


def test_changed_preset_in_code_recrafts(tmp_path, monkeypatch):
    """The perturbation cache key holds the preset's values, not only its name: a preset whose
    values change in the code is crafted again instead of silently reusing the old file."""
    from genaf.attacks.base import _ATTACKS
    from genaf.bench import Bench

    b = Bench(load_config(TINY), tmp_path)
    a = next(x for x in b.cfg.attacks if x.attack == "l4a-base")
    before = b.pert_fp("tiny-resnet", a, a.eps[0], 0)
    assert b.pert_fp("tiny-resnet", a, a.eps[0], 0) == before  # stable
    cls = _ATTACKS["l4a-base"]
    monkeypatch.setattr(cls, "presets", {**cls.presets, "cpu": {**cls.presets["cpu"], "step": 0.5}})
    assert b.pert_fp("tiny-resnet", a, a.eps[0], 0) != before


# ---------------------------------------------------------------------------- the encoder lock
LOCKED = {
    **TINY,
    "name": "locked encoder",
    "datasets": [{"name": "fashion-mnist", "n_train": 32, "n_val": 16, "n_test": 32}],
    "surrogate": {"n": 16},
    "method_defaults": {"epochs": 1},
    "methods": {"sft": {}},
    "attacks": {"uniform-noise": {}},
    "seeds": [0],
    "whitebox": False,
    "fresh_head": False,
    "selfattack": False,
}


def _encoder_file(path: Path, seed: int) -> str:
    """A genaf encoder file (the demo architecture at width 4, random weights of ``seed``); its sha256."""
    import hashlib

    write_encoder(path, TINY_RESNET, seed)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_encoder_lock_refuses_a_changed_file_until_update_lock(tmp_path, capsys):
    """The first bench locks the sha256 of the encoder's file; the file changed, the next bench
    (API and CLI) is refused naming both hashes; --update-lock accepts it, rewrites the lock and
    computes the encoder's cells again instead of reusing the old file's run."""
    from genaf.cli import main
    from genaf.errors import CheckpointError

    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    enc = tmp_path / "enc.safetensors"
    old = _encoder_file(enc, seed=0)
    cfg = tmp_path / "locked.yaml"
    cfg.write_text(yaml.safe_dump({**LOCKED, "encoders": {"mine": f"file:{enc}"}}, sort_keys=False))
    out = tmp_path / "out"
    first = run_bench(cfg, out, log=lambda *_: None)
    lock = json.loads((out / "encoders.lock.json").read_text())
    files = lock["encoders"]["mine"]["files"]
    assert files == [{"name": enc.name, "path": str(enc), "sha256": old, "size": enc.stat().st_size}]
    assert first["computed"] == 1

    new = _encoder_file(enc, seed=1)
    assert new != old
    with pytest.raises(CheckpointError) as err:
        run_bench(cfg, out, log=lambda *_: None)
    msg = str(err.value)
    assert "\n" not in msg and "encoder mine" in msg and str(enc) in msg and "--update-lock" in msg
    assert f"locked sha256 {old}, now {new}" in msg
    assert json.loads((out / "encoders.lock.json").read_text()) == lock  # a refusal writes nothing

    capsys.readouterr()
    assert main(["bench", str(cfg), "--out", str(out), "-q"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("genaf bench: error: encoder mine: file ")
    assert old in err_lines[0] and new in err_lines[0] and "--update-lock" in err_lines[0]

    assert main(["bench", str(cfg), "--out", str(out), "--update-lock"]) == 0
    log = capsys.readouterr().out
    assert f"sha256 {old} -> {new}" in log
    assert "1 result row(s), 1 fine-tune run(s), 1 perturbation(s) and 0 per-sample DAE file(s) of mine" in log
    lock2 = json.loads((out / "encoders.lock.json").read_text())
    assert lock2["encoders"]["mine"]["files"][0]["sha256"] == new
    assert lock2["replaced"] == [{"encoder": "mine", "path": str(enc), "sha256": old, "replaced_by": new}]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["run"] != first["rows"][0]["run"]  # a new run, from the new file
    assert (out / first["rows"][0]["run"]).is_dir() and (out / rows[0]["run"]).is_dir()
    config = yaml.safe_load((out / rows[0]["run"] / "config.yaml").read_text())
    assert [f["sha256"] for f in config["encoder_files"]] == [new]
    # accepted: the lock now passes, and every row is done under the keys of the new file
    from genaf.bench import Bench, _row_key, check_encoder_lock

    locked, replaced = check_encoder_lock(load_config(cfg), out, log=lambda *_: None)
    assert not replaced and Bench(load_config(cfg), out, locked=locked).all_cells() == {
        _row_key(r): r["fingerprint"] for r in rows
    }


def test_encoder_lock_entries_and_the_hash_cache(tmp_path, monkeypatch):
    """What the lock records for specs without a file of their own, a missing file, and the
    per-process hash cache (by path, size and modification time)."""
    import hashlib

    from genaf.bench import encoder_lock_entry
    from genaf.encoders import file_sha256
    from genaf.encoders.demo import ASSET
    from genaf.errors import CheckpointError

    demo = encoder_lock_entry("demo", "demo")
    assert [f["path"] for f in demo["files"]] == [str(ASSET)]
    assert demo["files"][0]["sha256"] == hashlib.sha256(ASSET.read_bytes()).hexdigest()
    rnd = encoder_lock_entry("r", "random:demo")
    assert rnd["files"] == [] and "no file" in rnd["note"]
    with pytest.raises(CheckpointError, match=r"encoder gone \(file:\$NOPE/x.pt\): file .*x.pt does not exist"):
        encoder_lock_entry("gone", "file:$NOPE/x.pt")
    # solo-learn's args.json is read only when present: recorded as absent (sha256 null)
    monkeypatch.setenv("ENC_DIR", str(tmp_path))
    sha = _encoder_file(tmp_path / "last.ckpt", seed=0)
    solo = encoder_lock_entry("s", "solo:$ENC_DIR/last.ckpt")
    assert [(f["name"], f["sha256"]) for f in solo["files"]] == [("last.ckpt", sha), ("args.json", None)]

    f = tmp_path / "blob.bin"
    f.write_bytes(b"a" * 100)
    st = f.stat()
    first = file_sha256(f)
    f.write_bytes(b"b" * 100)  # same size; the modification time put back: the cached hash
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: hashed again
    assert file_sha256(f) == hashlib.sha256(b"b" * 100).hexdigest() != first


def test_encoder_lock_created_once_by_shards_starting_together(tmp_path):
    """Several shards check the lock at the same moment: one writes it (under the file lock), the
    others read it; all agree, and a later changed file is still refused."""
    import threading

    from genaf.bench import check_encoder_lock
    from genaf.errors import CheckpointError

    enc = tmp_path / "enc.safetensors"
    sha = _encoder_file(enc, seed=0)
    cfg = load_config({**LOCKED, "encoders": {"mine": f"file:{enc}", "rnd": "random:demo"}})
    out = tmp_path / "out"
    logs: list[str] = []
    results, errors = [], []
    start = threading.Barrier(4)

    def shard():
        start.wait()
        try:
            results.append(check_encoder_lock(cfg, out, log=logs.append))
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=shard) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(r == results[0] for r in results) and all(not replaced for _, replaced in results)
    assert sum("written to" in m for m in logs) == 1  # created once; the others found it
    lock = json.loads((out / "encoders.lock.json").read_text())
    assert lock["encoders"]["mine"]["files"][0]["sha256"] == sha and lock["encoders"]["rnd"]["files"] == []
    _encoder_file(enc, seed=1)
    with pytest.raises(CheckpointError, match=f"locked sha256 {sha}"):
        check_encoder_lock(cfg, out, log=logs.append)


def test_a_finetune_stopped_before_its_first_checkpoint_starts_again(tmp_path):
    """Killed after a unit's fine-tune wrote config.yaml but before its first epoch checkpoint, the
    run folder holds nothing to resume from: the next bench empties it and fine-tunes again (it
    used to stop with 'already holds a run'); a fine-tune still running in it is left alone."""
    from genaf.api import check_run_dir, run_lock
    from genaf.bench import Bench

    bench = Bench(load_config(TINY), tmp_path, log=lambda *_: None)
    seed, enc, ds, m = bench.units()[0]
    run = bench.run_dir(enc, ds, m, seed)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(run, resume=False)
    held = run_lock(run)  # a live fine-tune in the folder
    with pytest.raises(ConfigError, match="another genaf is writing"):
        bench._clear_unstarted(run)
    held.close()
    assert (run / "config.yaml").is_file()
    bench._clear_unstarted(run)
    assert [p.name for p in run.iterdir()] == [".genaf.lock"]
    check_run_dir(run, resume=False)  # the fine-tune may start there again


def test_encoder_labels_name_bare_specs_by_themselves():
    from genaf.bench import _encoder_label

    assert _encoder_label("demo") == "demo"
    assert _encoder_label("demo-vit") == "demo-vit"  # was "x": the empty path after no ':'
    assert _encoder_label("random") == "random-demo"
    assert _encoder_label("solo:/ckpts/simclr/last.ckpt") == "simclr-last"
    assert _encoder_label("timm:vit_tiny_patch16_224:/w/vit.safetensors") == "vit"


def test_report_gives_paired_differences_with_intervals_on_each_split(tmp_path):
    """Each method minus genaf on the same seed, with the 95 % t-interval of the mean; validation
    first (it decides), test after."""
    rows = _fake_rows()
    for r in rows:  # validation: genaf one point higher than on test, the others as on test
        bump = 0.01 if r["method"] == "genaf" else 0.0
        r["val_clean_acc"], r["val_robust_acc"] = r["clean_acc"] + bump, r["robust_acc"] + bump
    (tmp_path / "results.json").write_text(json.dumps({"name": "fake", "rows": rows}))
    text = build_report(tmp_path).read_text()
    section = text.split("Paired differences from `genaf`")[1].split("Clean–robust trade-off")[0]
    lines = {ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert set(lines) == {"method", "sft", "at", "greedy"}
    assert lines["method"].index("(validation)") < lines["method"].index("(test)")
    cells = [c.strip() for c in lines["at"].split("|")[2:-1]]
    # at - genaf, clean: -10, -10 on test, -11, -11 on validation; mean DAE RA: at (65, 68) against
    # genaf (57.5, 59.5) -> +7.5, +8.5 on test: mean +8.0, sd 0.707, t(1) 12.706 -> ± 6.4
    assert cells[0] == "-11.0 -11.0 (**-11.0** ± 0.0)"
    assert cells[1] == "+6.5 +7.5 (**+7.0** ± 6.4)"
    assert cells[2] == "-10.0 -10.0 (**-10.0** ± 0.0)"
    assert cells[3] == "+7.5 +8.5 (**+8.0** ± 6.4)"
    # one seed: no interval, and no table
    one = [r for r in rows if r["seed"] == 0]
    (tmp_path / "results.json").write_text(json.dumps({"name": "fake", "rows": one}))
    assert "Paired differences" not in build_report(tmp_path).read_text()
