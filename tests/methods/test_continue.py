"""finetune(continue_from=...): a longer run that starts from a shorter run's last epoch computes
what the longer run computes from scratch (the demo's and the bench's budget controls use it)."""

import json

import pytest
import torch

from _tiny import tiny_resnet
from genaf.api import finetune
from genaf.errors import ConfigError
from genaf.models import load_model
from genaf.train import LAST_EPOCH

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"batch_size": 64, "n_val_robust": 32, "val_steps": 1}
DATA = {"n_train": 192, "n_val": 96, "n_test": 96}


def _run(out, method, data, encoder, mc, train=None, **kw):
    return finetune(
        encoder,
        "fashion-mnist",
        method,
        out,
        method_config=mc,
        train={**TRAIN, **(train or {})},
        data=dict(DATA),
        datamodule=data,
        log=lambda *_: None,
        **kw,
    )


def _history(out):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((out / "history.json").read_text())]


@pytest.mark.parametrize(
    "method,short,long",
    [
        ("sft", {"epochs": 2}, {"epochs": 3}),
        ("at", {"epochs": 1, "attack_steps": 2}, {"epochs": 3, "attack_steps": 2}),  # head warm-up, then AT
    ],
)
def test_a_continued_run_equals_the_same_run_from_scratch(tmp_path, tiny_data, method, short, long):
    enc = tiny_resnet(tmp_path)
    _run(tmp_path / "short", method, tiny_data, enc, short, {"keep_last_epoch": True})
    assert (tmp_path / "short" / LAST_EPOCH).is_file() and not (tmp_path / "short" / "checkpoint.pt").exists()
    scratch = _run(tmp_path / "scratch", method, tiny_data, enc, long)
    cont = _run(tmp_path / "cont", method, tiny_data, enc, long, continue_from=tmp_path / "short")

    assert cont["continued_from"]["run"] == str(tmp_path / "short")
    assert cont["continued_from"]["epochs"] == short["epochs"]
    assert "continued_from" not in scratch
    for key in ("clean_acc", "robust_acc", "selected_epochs", "budget", "weight_drift"):
        assert cont[key] == scratch[key], key
    assert _history(tmp_path / "cont") == _history(tmp_path / "scratch")
    assert len(_history(tmp_path / "cont")) == long["epochs"] + (method == "at")  # + the head warm-up
    predictions = [(tmp_path / run / "predictions.json").read_text() for run in ("cont", "scratch")]
    assert predictions[0] == predictions[1]
    a, b = load_model(tmp_path / "cont").state_dict(), load_model(tmp_path / "scratch").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = (tmp_path / "cont" / "config.yaml").read_text()
    assert "continued_from" in saved


def test_continuing_is_refused_when_it_would_compute_something_else(tmp_path, tiny_data):
    enc = tiny_resnet(tmp_path)
    _run(tmp_path / "plain", "sft", tiny_data, enc, {"epochs": 1})
    with pytest.raises(ConfigError, match="keep_last_epoch"):
        _run(tmp_path / "a", "sft", tiny_data, enc, {"epochs": 3}, continue_from=tmp_path / "plain")
    _run(tmp_path / "kept", "sft", tiny_data, enc, {"epochs": 2}, {"keep_last_epoch": True})
    with pytest.raises(ConfigError, match=r"encoder_lr: saved 0\.0001, now 0\.001"):
        _run(tmp_path / "b", "sft", tiny_data, enc, {"epochs": 3, "encoder_lr": 1e-3}, continue_from=tmp_path / "kept")
    with pytest.raises(ConfigError, match="only the last stage's epochs may grow"):
        _run(tmp_path / "c", "sft", tiny_data, enc, {"epochs": 1}, continue_from=tmp_path / "kept")
    for out in ("a", "b", "c"):  # refused before anything was written
        assert not (tmp_path / out / "checkpoint.pt").exists()
