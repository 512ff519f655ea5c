"""The same seed gives bit-identical metrics on the CPU; seed and versions are recorded."""

import json

import yaml

from _tiny import shared_tiny_resnet
from genaf import api


def _run(out, tiny_data, seed):
    return api.finetune(
        shared_tiny_resnet(),  # the demo ResNet at width 4, random weights
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


def test_deterministic_mode_is_recorded_and_restored(tmp_path, tiny_data):
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    m = api.finetune(
        shared_tiny_resnet(),
        "fashion-mnist",
        "sft",
        tmp_path / "det",
        method_config={"epochs": 1},
        train={"batch_size": 64, "progress": False, "n_val_robust": 32, "device": "cpu", "deterministic": True},
        datamodule=tiny_data,
        log=lambda *a: None,
    )
    assert m["determinism"]["deterministic"] is True and m["determinism"]["nondeterministic_ops"] == []
    assert torch.are_deterministic_algorithms_enabled() == before  # the global switch is given back
    saved = yaml.safe_load((tmp_path / "det" / "config.yaml").read_text())
    assert saved["train"]["deterministic"] is True
    off = _run(tmp_path / "off", tiny_data, 0)
    assert off["determinism"] == {"deterministic": False, "nondeterministic_ops": []}


def test_deterministic_mode_names_ops_without_a_deterministic_kernel():
    """torch only warns (warn_only) on CUDA ops without a deterministic kernel; the CPU has none to
    trigger, so the test raises torch's own wording and checks it is collected, and that other
    warnings are passed on."""
    import warnings

    import torch

    from genaf.utils import deterministic_mode

    msg = "scatter_add_cuda_kernel does not have a deterministic implementation, but you set 'torch.use_determ..."
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with deterministic_mode(True) as info:
            assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
            warnings.warn(msg, UserWarning, stacklevel=1)
            warnings.warn(msg, UserWarning, stacklevel=1)
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert info["nondeterministic_ops"] == [msg]
    assert [str(w.message) for w in outer] == ["an unrelated warning"]
