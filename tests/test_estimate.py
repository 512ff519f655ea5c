"""A long fine-tune is announced before it starts, with an estimate and the flags that shrink it."""

import pytest
import torch
from torch import nn

from genaf.estimate import ANNOUNCE_SECONDS, announce_cost, announcement, estimate_seconds, step_passes, time_one_pass
from genaf.methods.base import create_method


def test_passes_per_stage_follow_the_attack_steps():
    at = create_method("at", epochs=10, attack_steps=10)
    sft = create_method("sft", epochs=10)
    (st,) = [s for s in at.stages() if callable(getattr(s, "attack", None))]
    assert step_passes(st, at.cfg) == 11
    assert all(step_passes(s, sft.cfg) == 1 for s in sft.stages())
    # default finetune scale: 54k images, batch 128, AT 10 epochs x 11 passes, 0.2 s a pass -> hours
    est = estimate_seconds(0.2, 54000, 128, at.stages(), at.cfg)
    assert est["batches_per_epoch"] == 421
    expected = 421 * 0.2 * sum(s.epochs * step_passes(s, at.cfg) for s in at.stages())
    assert est["seconds"] == pytest.approx(expected)
    msg = announcement(est, 54000, "cpu")
    assert msg is not None and "hours on cpu" in msg and "--n-train" in msg and "--attack-steps" in msg
    short = estimate_seconds(0.02, 500, 128, sft.stages(), sft.cfg)
    assert short["seconds"] < ANNOUNCE_SECONDS and announcement(short, 500, "cpu") is None


def test_timing_leaves_the_model_as_it_was(tiny_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 10), nn.BatchNorm1d(10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, _ = next(iter(tiny_data.train.batches(16)))
    assert time_one_pass(model, x, y) > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sft = create_method("sft", epochs=1)
    assert announce_cost(model, tiny_data, sft.stages(), sft.cfg, 16, "cpu") is None  # seconds, not hours
