"""The same seed gives bit-identical metrics on the CPU; seed and versions are recorded."""

import json

import yaml

from genaf import api


def _run(out, tiny_data, seed):
    return api.finetune(
        "random:demo",
        "fashion-mnist",
        "at",
        out,
        method_config={"epochs": 1, "attack_steps": 2, "warmup_epochs": 0},
        train={"batch_size": 64, "progress": False, "n_val_robust": 32, "device": "cpu"},
        seed=seed,
        datamodule=tiny_data,
        log=lambda *a: None,
    )


def _strip(m):
    """Everything but wall-clock times (at any depth)."""
    if isinstance(m, dict):
        return {k: _strip(v) for k, v in m.items() if not k.endswith("seconds")}
    return m


def test_same_seed_bit_identical_and_recorded(tmp_path, tiny_data):
    a = _run(tmp_path / "a", tiny_data, 3)
    b = _run(tmp_path / "b", tiny_data, 3)
    assert _strip(a) == _strip(b)
    pa = json.loads((tmp_path / "a" / "predictions.json").read_text())
    pb = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert pa == pb
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["seed"] == 3 and {"torch", "genaf", "python"} <= set(saved["versions"])
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["seed"] == 3
