"""Fast mode of the adversarial stages (``attack_steps = 1``): FGSM with a uniform random start
and a step of ``fast_step_factor``·ε, and the guard against catastrophic overfitting.

Everything runs on a tiny synthetic task (8×8 images, two classes told apart by their
brightness, so a small model is robust at ε = 8/255) and a tiny CNN, so the Trainer runs in
well under a second per epoch."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genaf.attacks.whitebox import pgd
from genaf.data.module import DataModule, ImageSet
from genaf.encoders.base import Encoder
from genaf.errors import ConfigError
from genaf.methods.base import Context, create_method
from genaf.methods.genaf import Stage1
from genaf.models import DownstreamModel
from genaf.train import TrainConfig, Trainer

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


class Trap(nn.Module):
    """A deliberately constructed collapse of robustness. Identity in train mode and on every
    clean image (it knows them all: ``known``); once ``armed`` (after ``arm_after`` training
    forwards), an eval-mode input that is not a clean image — i.e. any perturbed one — is
    replaced by its negative ``1 − x``, which flips the brightness class. PGD accuracy
    collapses while clean accuracy and training are untouched: the signature of
    catastrophic overfitting. Counts eval-mode forwards of inputs that require gradients
    (attack steps)."""

    def __init__(self, known: torch.Tensor | None = None, arm_after: int | None = None):
        super().__init__()
        self.known, self.arm_after, self.train_forwards, self.attack_forwards = known, arm_after, 0, 0

    def forward(self, x):
        if self.training:
            self.train_forwards += 1
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            self.attack_forwards += 1
        if self.arm_after is None or self.train_forwards <= self.arm_after:
            return x
        clean = (x.detach()[:, None] == self.known[None]).flatten(2).all(2).any(1)
        return torch.where(clean[:, None, None, None], x, 1 - x)


class TinyNet(nn.Module):
    def __init__(self, trap: Trap):
        super().__init__()
        self.trap = trap
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 8

    def forward(self, x):
        return self.pool(F.relu(self.conv(2 * self.trap(x) - 1))).flatten(1)


def tiny_model(data=None, arm_after=None, seed=0):
    torch.manual_seed(seed)
    known = None if data is None else torch.cat([s.float_images() for s in (data.train, data.val, data.test)])
    trap = Trap(known, arm_after)
    # identity normalisation, so the trap sees the pixels themselves
    enc = Encoder(TinyNet(trap), {"arch": "tiny", "mean": [0.0] * 3, "std": [1.0] * 3})
    return DownstreamModel(enc, 2, head="linear"), trap


def brightness_task(n_train=128, n_val=64, seed=0) -> DataModule:
    g = torch.Generator().manual_seed(seed)

    def split(n, name):
        y = torch.arange(n) % 2
        level = torch.where(y == 1, 190.0, 60.0)[:, None, None, None]
        x = (level + 25 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 255).round().to(torch.uint8)
        return ImageSet(x, y, torch.arange(n), name)

    return DataModule(
        "brightness",
        ["dark", "bright"],
        split(n_train, "train"),
        split(n_val, "val"),
        split(n_val, "test"),
        split(8, "train"),
        8,
    )


def fit(tmp_path, model, data, log=None, **mc):
    cfg = dict(dict(epochs=3, attack_steps=1, warmup_epochs=0, head_lr=0.05, encoder_lr=0.01, guard_size=64), **mc)
    method = create_method("at", **cfg)
    tcfg = TrainConfig(batch_size=32, n_val_robust=32, val_steps=1, augment=False, progress=False, device="cpu")
    trainer = Trainer(model, data, method, tcfg, tmp_path, torch.device("cpu"), log=log or (lambda *_: None))
    trainer.fit()
    return trainer


class Ctx:
    seed = 0
    artifacts: dict = {}


def test_fgsm_rs_step_and_budget():
    model, _ = tiny_model()
    data = brightness_task()
    x, y = data.train.float_images()[:32], data.train.labels[:32]
    stage = Stage1(create_method("at", attack_steps=1).cfg, 1, name="at")
    assert stage.fast(Ctx()) and stage.attack_steps(Ctx()) == 1
    stage._gen = torch.Generator().manual_seed(7)
    xa = stage.attack(model, x, y, Ctx())
    # by hand: uniform start in the ε-ball, one signed-gradient step of 1.25 ε, projection
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    x0 = (x + (noise * 2 - 1) * EPS).clamp(0, 1).requires_grad_(True)
    model.eval()
    (g,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    want = torch.min(torch.max(x0.detach() + 1.25 * EPS * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    assert torch.equal(xa, want)
    delta = (xa - x).abs()
    assert delta.max() <= EPS + 1e-6
    inside = (x > EPS) & (x < 1 - EPS)
    assert (delta[inside] > EPS - 1e-6).float().mean() > 0.5  # a 1.25 ε step mostly lands on the boundary
    assert all(p.grad is None for p in model.parameters())


def test_other_budgets_are_unchanged():
    model, _ = tiny_model()
    data = brightness_task()
    x, y = data.train.float_images()[:16], data.train.labels[:16]
    # K = 10 (the default): exactly genaf.attacks.whitebox.pgd with attack_step
    stage = Stage1(create_method("at").cfg, 1, name="at")
    assert not stage.fast(Ctx()) and stage.attack_steps(Ctx()) == 10
    stage._gen = torch.Generator().manual_seed(3)
    want = pgd(model, x, y, EPS, 2 / 255, 10, gen=torch.Generator().manual_seed(3))
    assert torch.equal(stage.attack(model, x, y, Ctx()), want)
    # fast_step_factor = 0: one plain PGD step of attack_step
    stage = Stage1(create_method("at", attack_steps=1, fast_step_factor=0).cfg, 1, name="at")
    assert not stage.fast(Ctx())
    stage._gen = torch.Generator().manual_seed(3)
    want = pgd(model, x, y, EPS, 2 / 255, 1, gen=torch.Generator().manual_seed(3))
    assert torch.equal(stage.attack(model, x, y, Ctx()), want)
    with pytest.raises(ConfigError):
        create_method("at", guard_action="ignore")


def test_guard_quiet_on_a_normal_run(tmp_path):
    model, trap = tiny_model()
    trainer = fit(tmp_path, model, brightness_task())
    rows = [r for r in trainer.history if r["stage"] == "at"]
    assert len(rows) == 3 and all("guard_pgd_acc" in r for r in rows)
    assert all(not r.get("guard_triggered") for r in rows)
    assert rows[-1]["guard_pgd_acc"] > 0.8  # the task is robustly learnable at this ε
    assert "fallback_epoch" not in trainer.artifacts["guard"]["at"]


def test_guard_falls_back_to_pgd_when_robustness_collapses(tmp_path):
    # 4 training batches per epoch: the trap arms after the first epoch
    data = brightness_task()
    model, trap = tiny_model(data, arm_after=4)
    counts, logs = [], []

    def log(msg):
        logs.append(msg)
        if re.match(r"\S+ epoch \d+/\d+ \(", msg):  # the Trainer's line at the end of each epoch
            counts.append(trap.attack_forwards)

    trainer = fit(tmp_path, model, data, log=log, epochs=4)
    rows = [r for r in trainer.history if r["stage"] == "at"]
    accs = [r["guard_pgd_acc"] for r in rows[:2]]
    assert accs[0] > 0.8 and accs[1] < 0.3, accs  # collapsed in epoch 2
    assert rows[1].get("guard_triggered") and not rows[0].get("guard_triggered")
    assert any("CATASTROPHIC OVERFITTING" in m for m in logs)
    state = trainer.artifacts["guard"]["at"]
    assert state["fallback_epoch"] == 2 and state["action"] == "fallback"
    assert len(rows) == 4 and "guard_pgd_acc" not in rows[2]  # no more checks: PGD now
    # attack forwards per epoch: 4 batches × steps + the guard's PGD-10 on 64 images + validation
    per_epoch = [b - a for a, b in zip([0] + counts, counts)]
    validation = 1  # TrainConfig: one batch of 32 images, val_steps=1
    assert per_epoch[0] == 4 * 1 + 10 + validation
    assert per_epoch[2] == per_epoch[3] == 4 * 10 + validation
    stage = trainer.stages[0]
    ctx = Context(None, torch.device("cpu"), 0, None, print, artifacts=trainer.artifacts)
    assert not stage.fast(ctx) and stage.attack_steps(ctx) == 10


def test_guard_stop_action_ends_the_stage(tmp_path):
    data = brightness_task()
    model, trap = tiny_model(data, arm_after=4)
    trainer = fit(tmp_path, model, data, epochs=4, guard_action="stop")
    rows = [r for r in trainer.history if r["stage"] == "at"]
    assert len(rows) == 2 and rows[-1].get("stop") and rows[-1].get("guard_triggered")
    assert trainer.artifacts["selected_epoch"]["stage0:at"] == 1  # the epoch before the collapse


def test_guard_reuses_validation_and_restarts_its_best_when_eps_changes():
    """With an ε ramp the check's ε moves, so accuracies at different ε are not compared; the
    Trainer's robust validation serves as the check when it is at least as strong."""
    stage = Stage1(create_method("at", attack_steps=1, eps_ramp_epochs=1).cfg, 3, name="at")
    logs = []
    ctx = Context(data=object(), device=torch.device("cpu"), seed=0, reference_encoder=None, log=logs.append)
    out = []
    for epoch, acc in enumerate([0.9, 0.6, 0.3]):
        stage.begin_epoch(epoch)
        eps, step = stage.budget()
        val_attack = {"eps": eps, "step": step, "steps": 10, "n": 128}
        out.append(stage.end_epoch(None, ctx, {"val_clean": 1.0, "val_robust": acc}, val_attack))
    assert [o["guard_pgd_acc"] for o in out] == [0.9, 0.6, 0.3]
    assert not out[0].get("guard_triggered") and not out[1].get("guard_triggered")  # ε/2 → ε: best restarts
    assert out[2].get("guard_triggered") and ctx.artifacts["guard"]["at"]["fallback_epoch"] == 3
    assert logs and "CATASTROPHIC OVERFITTING" in logs[-1]
    assert stage.attack_steps(ctx) == 10
