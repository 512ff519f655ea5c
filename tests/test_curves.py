"""Training curves: train.logger csv writes history.csv one row per epoch (history.json stays)."""

from __future__ import annotations

import json
import math

import pytest

from genaf.curves import CsvCurves, check_logger, curve_logger, read_history_csv
from genaf.errors import ConfigError
from genaf.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(rows: list[dict], history: list[dict]) -> None:
    assert len(rows) == len(history)
    for got, want in zip(rows, history):
        assert set(got) == {k for k, v in want.items() if v is not None}
        for k, v in got.items():
            if isinstance(want[k], float) and math.isnan(want[k]):
                assert math.isnan(v)
            else:
                assert v == want[k], k


def test_rows_are_appended_and_a_new_field_or_a_resume_rewrites(tmp_path):
    path = tmp_path / "history.csv"
    log = CsvCurves(path)
    history = [{"stage": "s1", "epoch": 1, "loss": 0.5, "val_clean": 0.25}]
    log(history)
    _same(read_history_csv(path), history)
    inode = path.stat().st_ino
    history.append({"stage": "s1", "epoch": 2, "loss": 1 / 3, "val_clean": float("nan")})
    log(history)
    assert path.stat().st_ino == inode  # appended in place, not rewritten
    _same(read_history_csv(path), history)
    # a later stage with more fields (a nested one too): the header grows, every row stays
    history.append({"stage": "s2", "epoch": 1, "loss": 0.125, "guard": {"acc": 0.5, "stop": False}, "stop": True})
    log(history)
    rows = read_history_csv(path)
    _same(rows, history)
    assert path.read_text().splitlines()[0] == "stage,epoch,loss,val_clean,guard,stop"
    # a resumed run (a new logger over the restored history) writes the file again from it
    path.write_text("stale\n")
    history.append({"stage": "s2", "epoch": 2, "loss": 0.0625})
    CsvCurves(path)(history)
    _same(read_history_csv(path), history)


def test_unknown_logger_and_tensorboard_without_its_package(tmp_path):
    with pytest.raises(ConfigError, match="unknown logger 'wandb'; choose one of: none, csv, tensorboard"):
        TrainConfig(logger="wandb").validate()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            TrainConfig(logger="tensorboard").validate()
        return
    check_logger("tensorboard")
    log = curve_logger("tensorboard", tmp_path)
    log([{"stage": "sft", "epoch": 1, "loss": 0.5}])
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_tiny_run_with_the_csv_logger_matches_history_json(tmp_path):
    from genaf import api
    from genaf.data import load_dataset

    try:
        dm = load_dataset("fashion-mnist", n_train=64, n_val=32, n_test=32, seed=0)
    except Exception as exc:  # the dataset is not installed here
        pytest.skip(f"Fashion-MNIST is not available ({exc})")
    out = tmp_path / "run"
    api.finetune(
        "random:demo",
        "fashion-mnist",
        "sft",
        out,
        method_config={"epochs": 2},
        train={"batch_size": 32, "n_val_robust": 8, "val_steps": 1, "augment": False, "logger": "csv"},
        datamodule=dm,
        config={"eval": {"whitebox": None}},
        log=lambda *a: None,
    )
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    _same(read_history_csv(out / "history.csv"), history)
