"""Progress on long steps: a bar on a terminal, one plain line per unit of work in a log or a
pipe, nothing with --quiet (genaf.utils.Progress)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genaf import utils
from genaf.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dataset", "fashion-mnist-demo", "--n-train", "48", "--n-val", "16", "--n-test", "40"]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_one_per_unit_with_eta():
    lines = []
    bar = utils.Progress(4, "bench", unit="cells", log=lines.append, terminal=False)
    clock = Clock()
    bar.t0, bar._time = clock.t, clock
    for i in range(4):
        clock.t += 10
        bar.update(1, f"cell {i + 1} done")
    bar.close()
    assert len(lines) == 4
    assert lines[0] == "bench: 1/4 cells (25 %), 10 s, ETA 30 s; cell 1 done"  # 10 s per cell so far, 3 left
    assert lines[1].startswith("bench: 2/4 cells (50 %), 20 s, ETA 20 s")
    assert lines[3] == "bench: 4/4 cells (100 %), 40 s; cell 4 done"  # no ETA when done


def test_fine_grained_loops_report_at_most_n_lines():
    lines = []
    with utils.Progress(1000, "crafting x", unit="iterations", log=lines.append, lines=10, terminal=False) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(lines) == 10 and lines[-1].startswith("crafting x: 1000/1000 iterations (100 %)")
    assert [int(re.search(r"(\d+)/1000", s).group(1)) for s in lines] == list(range(100, 1001, 100))


def test_terminal_gets_a_bar_and_quiet_silences_everything(capsys):
    lines = []
    bar = utils.Progress(3, "x", log=lines.append, terminal=True)
    assert bar.mode == "bar"
    bar.update(3)
    bar.close()
    assert lines == [] and "x:" in capsys.readouterr().err  # a tqdm bar on stderr, not the log
    old = utils.set_quiet(True)
    try:
        for terminal in (True, False):
            b = utils.Progress(3, "x", log=lines.append, terminal=terminal)
            b.update(3)
            assert b.mode == "off"
    finally:
        utils.set_quiet(old)
    assert lines == [] and capsys.readouterr().err == ""
    assert utils.Progress(3, "x", log=None, terminal=False).mode == "off"  # no log: a silent library call


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    cfg = tmp / "cfg.yaml"
    cfg.write_text("eval:\n  batch_size: 16\n  whitebox: {steps: 2}\n")
    run = tmp / "run"
    argv = ["finetune", "--encoder", "random:demo", "--method", "sft", "--epochs", "1", "--config", str(cfg)]
    assert main(argv + DATA + ["--out", str(run), "--device", "cpu", "--quiet"]) == 0
    return run


def _piped(log: Path, *args) -> str:
    """Run `genaf ARGS > log 2>&1` (stdout and stderr a file, as in a batch job) and read the log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        cmd = [sys.executable, "-m", "genaf", *map(str, args)]
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    assert r.returncode == 0, text
    return text


ATTACK = ["attack", "--encoder", "demo", "--attack", "l4a-base", "--eps", "16/255", "--surrogate", "fashion-mnist-demo"]
ATTACK += ["--n-surrogate", "40", "--set", "layer=auto", "--set", "layer_candidates=relu,layer1.0"]
ATTACK += ["--set", "iterations=4", "--set", "batch_size=8", "--device", "cpu"]


def test_attack_and_evaluate_piped_to_a_file_show_every_unit(tiny_run, tmp_path):
    pert = tmp_path / "l4a.safetensors"
    text = _piped(tmp_path / "attack.log", *ATTACK, "--out", pert)
    # the auto layer choice: one line per candidate ...
    for k, cand in enumerate(("relu", "layer1.0"), 1):
        assert re.search(rf"choosing layer \(auto\): {k}/2 candidates .*layer={re.escape(cand)}: held-out", text), text
        # ... and each candidate's crafting, up to its last iteration, with what the number is
        assert re.search(rf"\[layer={re.escape(cand)}\] crafting l4a-base: 4/4 iterations \(100 %\).*objective", text)
    assert "ETA" in text and pert.is_file()

    # a copy of the run without the self-checks its fine-tune recorded: this evaluation runs them
    import json
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("checks")
    (run / "metrics.json").write_text(json.dumps(metrics))
    ev = ["evaluate", "--model", run, "--perturbation", pert, "--whitebox", "--attack", "ssp"]
    ev += ["--set", "steps=2", "--device", "cpu"]
    text = _piped(tmp_path / "evaluate.log", *ev)
    # 40 test images in batches of 16: 3 batches; per batch the clean+universal unit, ssp, fgsm, pgd
    total = 3 * 4
    for b in (1, 2, 3):
        for what in ("clean + 1 universal", "ssp (per-sample", "fgsm-wb (white-box", "pgd2-wb (white-box"):
            line = rf"evaluating on 40 test images: \d+/{total} attack batches .*batch {b}/3: {re.escape(what)}"
            assert re.search(line, text), (b, what, text)
    assert f"{total}/{total} attack batches (100 %)" in text
    # the white-box self-checks: one line per PGD run, saying what the number is
    assert re.search(r"self-checks on 40 images: 1/\d+ PGD runs.*PGD loss", text)
    assert re.search(r"self-checks on 40 images: (\d+)/\1 PGD runs .*robust acc [\d.]+ %", text)
    assert "clean accuracy" in text
    # evaluated again, unchanged: the white-box self-checks are taken from the first evaluation, and it says so
    text = _piped(tmp_path / "again.log", "evaluate", "--model", run, "--perturbation", pert, "--device", "cpu")
    assert "PGD runs" not in text
    assert "self-checks on 40 images: white-box PGD results reused from the earlier evaluation" in text
    assert json.loads((run / "metrics.json").read_text())["checks"]["whitebox_reused"] is True


def test_quiet_removes_the_progress_lines(tiny_run, tmp_path):
    pert = tmp_path / "l4a.safetensors"
    text = _piped(tmp_path / "attack.log", *ATTACK, "--out", pert, "--quiet")
    assert "candidates" not in text and "iterations" not in text and "ETA" not in text
    assert text.startswith("wrote ") and len(text.strip().splitlines()) == 1  # the result line only
    text = _piped(tmp_path / "evaluate.log", "evaluate", "--model", tiny_run, "--perturbation", pert, "--whitebox",
                  "--device", "cpu", "--quiet")
    assert "attack batches" not in text and "PGD runs" not in text and "ETA" not in text
    assert "clean accuracy" in text


def test_pretraining_reports_each_epoch_with_an_eta():
    from genaf.data import load_dataset
    from genaf.encoders.demo import DEMO_META
    from genaf.pretrain import pretrain

    data = load_dataset("fashion-mnist-demo", n_train=64, n_val=16, n_test=16, seed=0).train
    lines = []
    pretrain(data, dict(DEMO_META, width=4), method="simclr", epochs=2, batch_size=32, log=lines.append)
    assert re.match(r"pretraining simclr: 1/2 epochs \(50 %\), .*ETA .*; mean simclr loss \d", lines[0]), lines
    assert lines[1].startswith("pretraining simclr: 2/2 epochs (100 %)"), lines
    old = utils.set_quiet(True)
    try:
        quiet = []
        pretrain(data, dict(DEMO_META, width=4), method="simclr", epochs=1, batch_size=32, log=quiet.append)
        assert quiet == []
    finally:
        utils.set_quiet(old)


def test_bench_reports_each_finished_unit_with_an_eta_from_the_cells_done(tmp_path, monkeypatch):
    """Bench.run: one line per fine-tuned model's cells, counting only the cells still to do (a
    resumed bench's finished cells are not counted), with an ETA. The units are faked: the
    wiring is what is tested here; tests/test_bench.py runs real ones."""
    from genaf import bench as bench_mod

    cfg = bench_mod.load_config(
        {
            "name": "progress",
            "device": "cpu",
            "encoders": ["random:demo"],
            "datasets": [{"name": "fashion-mnist-demo", "n_train": 64, "n_val": 32, "n_test": 64}],
            "methods": {"sft": {}, "at": {}, "lp": {}},
            "attacks": {"uniform-noise": {}},
            "eps": ["16/255"],
            "seeds": [0],
        }
    )
    lines = []
    b = bench_mod.Bench(cfg, tmp_path, log=lines.append)
    units = [(e, d, m, 0) for e, _ in cfg.encoders for d in cfg.datasets for m in cfg.methods]
    cells = {m.label: b.unit_cells(e, d, m, s) for e, d, m, s in units}
    first = next(iter(cells))
    for k, c in cells[first].items():  # the first model's cells are finished already (a resumed bench)
        b.rows[k] = c

    def fake_unit(enc, ds, m, seed, label):
        pending = [c for k, c in b.unit_cells(enc, ds, m, seed).items() if k not in b.rows]
        for c in pending:
            b.rows[bench_mod._row_key(c)] = c
        b.computed += len(pending)

    monkeypatch.setattr(b, "unit", fake_unit)
    b.run()
    todo = sum(len(v) for k, v in cells.items() if k != first)
    assert todo > 0
    progress = [ln for ln in lines if ln.startswith("bench: ")]
    assert len(progress) == len(cells) - 1, lines  # the finished unit reports nothing
    assert re.match(rf"bench: {todo // 2}/{todo} cells \(50 %\), \d+ s, ETA \d+ s; \[2/3\] .* done", progress[0])
    assert progress[-1].startswith(f"bench: {todo}/{todo} cells (100 %)") and "done" in progress[-1]
