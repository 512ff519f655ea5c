"""Data-parallel training (genaf.distributed): two CPU processes on gloo, started as torchrun starts
them (tests/_ddp.py), against one process with the same global batch.

What "the same" means here. Both runs compute the same thing: the same global batches in the same
order, the same random starts and augmentations (drawn for the whole batch, genaf.utils.RowGenerator),
BatchNorm on the global batch's statistics, the genetic regulariser on the gathered global batch
(``genetic_batch: global``), a linear head (no dropout, whose masks are each process's own stream).
What differs is the order of float additions: the gradient is the average of two half-batch
gradients, BatchNorm's sums are added across processes. Those ~1e-7 relative differences are then
amplified by sign steps, PGD's ``sign(∇x)`` and Adam's first update ``≈ lr·sign(g)``, where a
coordinate near zero flips. Measured on this configuration: epoch losses within 1e-5 relative and
every test prediction identical; on a larger one (128 training and 96 test images, PGD-10) losses
within 1e-4 and 1-2 of 96 white-box predictions apart. Hence the tolerances: losses within 1e-3
relative, every accuracy within 3 test images, at least 90 % of per-sample predictions identical. A
real fault is far outside them: per-process BatchNorm statistics or a per-process regulariser change
the epoch losses by more than 1e-3, a missing gradient average by far more.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import _ddp

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL = 1e-3
MAX_IMAGES_APART = 3
MIN_SAME_PREDICTIONS = 0.9

GENAF = {
    "encoder": "demo",
    "dataset": "fashion-mnist",
    "method": "genaf",
    "config": {"head": "linear", "eval": {"whitebox": {"steps": 3}}},
    "method_config": {
        "epochs": 1,
        "attack_steps": 2,
        "warmup_epochs": 0,
        "stage2_epochs": 1,
        "probe_size": 24,
        "sensitivity_steps": 2,
        "genetic_batch": "global",
        "lam": 1e4,  # the regulariser on (off by default): its gathered batch is under test
    },
    "train": {"batch_size": 32, "progress": False, "n_val_robust": 16, "device": "cpu"},
}


def _one_process(out, kwargs, resume=False):
    from genaf import api

    assert "WORLD_SIZE" not in os.environ
    m = api.finetune(out=out, datamodule=_ddp.data(), log=lambda *a: None, resume=resume, **kwargs)
    assert not torch.distributed.is_initialized()  # one process: no process group, no DDP
    return m


def _read(run):
    return {f: json.loads((run / f).read_text()) for f in ("metrics.json", "predictions.json", "history.json")}


def _assert_like(a, b):
    """Run ``b`` trained like run ``a`` (see the module docstring for the tolerances)."""
    n = a["metrics.json"]["n_test"]
    assert b["metrics.json"]["n_test"] == n
    assert abs(a["metrics.json"]["clean_acc"] - b["metrics.json"]["clean_acc"]) * n <= MAX_IMAGES_APART
    for k, v in a["metrics.json"]["robust_acc"].items():
        assert abs(v - b["metrics.json"]["robust_acc"][k]) * n <= MAX_IMAGES_APART, k
    pa, pb = a["predictions.json"], b["predictions.json"]
    assert pa["index"] == pb["index"] and pa["label"] == pb["label"]
    for k in pa:
        same = sum(x == y for x, y in zip(pa[k], pb[k])) / len(pa[k])
        assert same >= MIN_SAME_PREDICTIONS, (k, same)
    ha, hb = a["history.json"], b["history.json"]
    assert [(r["stage"], r["epoch"]) for r in ha] == [(r["stage"], r["epoch"]) for r in hb]
    for ra, rb in zip(ha, hb):
        for k, v in ra.items():
            if k in ("loss", "ce_adv", "genetic", "ce"):
                assert rb[k] == pytest.approx(v, rel=LOSS_RTOL), (ra["stage"], k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("ddp")
    _one_process(root / "one", GENAF)
    _ddp.spawn(_ddp.finetune, 2, str(root / "two"), GENAF)
    return root


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    one, two = _read(runs / "one"), _read(runs / "two")
    _assert_like(one, two)
    m1, m2 = one["metrics.json"], two["metrics.json"]
    # the work is shared out, not repeated: every encoder pass is counted once
    assert m2["budget"] == m1["budget"]
    d = m2["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["per_process_batch"] == 16
    assert d["batchnorm"]["mode"] == "global" and d["batchnorm"]["global_layers"] > 0
    assert d["communication"]["grad"]["calls"] > 0 and d["communication"]["batchnorm"]["calls"] > 0
    assert "distributed" not in m1
    s1 = json.loads((runs / "one" / "sensitivity.json").read_text())
    s2 = json.loads((runs / "two" / "sensitivity.json").read_text())
    assert list(s1["sensitivity"]) == list(s2["sensitivity"])  # every layer, in the same order
    # The two runs score two models that differ at Adam's rounding-amplified level (see above), and
    # the scorer's weight ascent takes sign steps too: on one machine every score agreed, on another
    # (an AMD EPYC) one layer's score moved by 16 % and the 4th choice swapped with the 5th. The
    # scorer itself is checked on one model in test_sensitivity_dictionary_of_two_ranks_equals_one_rank;
    # here: the scores agree within 25 % and the choices share all but one layer.
    for k, v in s1["sensitivity"].items():
        assert s2["sensitivity"][k] == pytest.approx(v, rel=0.25, abs=1e-6), k
    assert len(set(s1["selected"]) & set(s2["selected"])) >= len(s1["selected"]) - 1
    # rank 0 alone wrote the run folder: the finished run's files, no leftovers
    files = {p.name for p in (runs / "two").iterdir()}
    assert files == {p.name for p in (runs / "one").iterdir()}
    assert not any(f.endswith(".tmp") for f in files) and "checkpoint.pt" not in files


def test_global_batchnorm_of_two_halves_is_batchnorm_of_the_whole_batch(tmp_path):
    """Output, input and affine gradients and running statistics of two processes holding half a
    batch each equal the plain layer's on the whole batch (two forwards before one backward, as in
    TRADES); float32 rounding of sums in another order is all that may differ."""
    one = _ddp.batchnorm(0)
    _ddp.spawn(_ddp.batchnorm, 2, str(tmp_path / "two.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["class_after"] == one["class_after"] == "BatchNorm2d" and two["batches"] == one["batches"] == 2
    for k in ("first", "second", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var"):
        assert torch.allclose(torch.tensor(two[k]), torch.tensor(one[k]), rtol=1e-5, atol=1e-5), k


def test_methods_import_nothing_of_torch_distributed():
    """The Trainer owns data parallelism: no method file imports or touches ``torch.distributed``;
    methods reach the other processes through ``ctx.parallel`` only."""
    found = _ddp.distributed_references("methods")
    assert len(found) > 5
    assert not {f: names for f, names in found.items() if names}


def test_sensitivity_dictionary_of_two_ranks_equals_one_rank(tmp_path, tiny_data):
    """The layers are split between the processes (round robin) and merged; the shared first ascent
    step is summed over the two halves of the probe. Each layer's score is computed by one process
    exactly as one process computes it; only the first step's sum order differs."""
    one = _ddp.sensitivity(0)
    _ddp.spawn(_ddp.sensitivity, 2, str(tmp_path / "two.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert list(two) == list(one) and len(one) > 10
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    from genaf.methods.sensitivity import select_redundant

    assert select_redundant(two, 4) == select_redundant(one, 4)


def test_two_process_run_killed_with_sigkill_resumes_on_one_process(runs, tmp_path):
    import signal

    from torch.multiprocessing import ProcessExitedException

    killed = tmp_path / "killed"
    with pytest.raises(ProcessExitedException) as info:  # rank 0 dies right after stage 1's checkpoint
        _ddp.spawn(_ddp.finetune, 2, str(killed), GENAF, (0, 1))
    assert info.value.exit_code == -signal.SIGKILL or info.value.signal_name == "SIGKILL"
    assert (killed / "checkpoint.pt").is_file() and not (killed / "metrics.json").exists()
    _one_process(killed, GENAF, resume=True)  # stage 1 ran on two processes, stage 2 runs on one
    _assert_like(_read(runs / "one"), _read(killed))


def _adversarial(method, options, batchnorm):
    return {
        "encoder": "demo",
        "dataset": "fashion-mnist",
        "method": method,
        "config": {"head": "linear", "eval": {"whitebox": {"steps": 2, "fgsm": False}}},
        "method_config": {"epochs": 1, "attack_steps": 2, "warmup_epochs": 0, **options},
        "train": {"batch_size": 32, "progress": False, "n_val_robust": 16, "device": "cpu", "ddp_batchnorm": batchnorm},
    }


def _probes(base):
    return [json.loads(open(f"{base}.{r}.json").read()) for r in (0, 1)]


def _assert_attacks_outside_ddp(records):
    for rec in records:
        assert rec["attacks"], "no training attack ran"
        assert all(a["allreduces"] == 0 for a in rec["attacks"])  # an attack step never all-reduces ...
        assert all(a["grads_unchanged"] for a in rec["attacks"])  # ... nor touches a parameter gradient
        assert rec["grad_allreduces"] > 0  # while the update steps did all-reduce


def test_trades_under_two_processes(tmp_path, tiny_data):
    """TRADES: a clean and an adversarial train-mode forward before one backward (with global
    BatchNorm statistics), equal to one process within the module's tolerances."""
    kwargs = _adversarial("trades", {"beta": 6.0}, "global")
    _one_process(tmp_path / "one", kwargs)
    _ddp.spawn(_ddp.finetune, 2, str(tmp_path / "two"), kwargs, None, str(tmp_path / "probe"))
    _assert_attacks_outside_ddp(_probes(tmp_path / "probe"))
    _assert_like(_read(tmp_path / "one"), _read(tmp_path / "two"))


def test_mart_under_two_processes_with_per_process_batchnorm(tmp_path, tiny_data):
    """MART: two train-mode forwards before one backward, each process normalising with its own
    statistics (``ddp_batchnorm: rank``, DDP's buffers never broadcast in the forward): it trains,
    and the running statistics averaged at the epoch's end leave both processes with one model."""
    kwargs = _adversarial("mart", {"lam": 5.0}, "rank")
    probe = str(tmp_path / "probe")
    _ddp.spawn(_ddp.finetune, 2, str(tmp_path / "two"), kwargs, None, probe)
    records = _probes(probe)
    _assert_attacks_outside_ddp(records)
    assert records[0]["state"] == records[1]["state"]
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["distributed"]["batchnorm"]["mode"] == "rank"
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


def test_global_batch_must_divide_by_the_processes(tmp_path, tiny_data):
    from torch.multiprocessing import ProcessRaisedException

    kwargs = dict(GENAF, train={**GENAF["train"], "batch_size": 33})
    with pytest.raises(ProcessRaisedException, match="must divide by the 2 processes"):
        _ddp.spawn(_ddp.finetune, 2, str(tmp_path / "odd"), kwargs)
    assert not (tmp_path / "odd" / "config.yaml").exists()
