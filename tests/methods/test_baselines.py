"""The baseline defenses (lp, trades, mart, fare, rift) and the ε schedule: short fits on tiny
real data that check each method's invariants, and the losses against hand-computed values."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from genaf.encoders import load_encoder
from genaf.errors import ConfigError
from genaf.methods import stage2_common
from genaf.methods.base import create_method, method_names
from genaf.methods.fare import FareStage, fare_loss
from genaf.methods.genaf import Stage1, scheduled_budget
from genaf.methods.lp import LinearProbe
from genaf.methods.mart import mart_loss
from genaf.methods.rift import RiftStage
from genaf.methods.trades import trades_kl
from genaf.models import DownstreamModel
from genaf.train import TrainConfig, Trainer

EPS = 8 / 255
FAST = dict(epochs=1, attack_steps=1, warmup_epochs=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tiny_data):
    """Two batches of 16 per epoch and 16 validation images: each fit takes seconds."""
    return dataclasses.replace(tiny_data, train=tiny_data.train.subset(32), val=tiny_data.val.subset(16))


def _fit(tmp_path, name, data, encoder="random:demo", **mc):
    method = create_method(name, **mc)
    torch.manual_seed(0)
    model = DownstreamModel(load_encoder(encoder), data.num_classes)
    cfg = TrainConfig(batch_size=16, n_val_robust=8, val_steps=1, augment=False, progress=False)
    run = tmp_path / name
    run.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, data, method, cfg, run, torch.device("cpu"), log=lambda *_: None)
    return model, trainer.fit()


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_keys(state):
    return [k for k in state if "running_" in k or "num_batches_tracked" in k]


@pytest.fixture()
def attack_guard(monkeypatch):
    """Wrap every adversarial stage's attack: no parameter gradient may appear or change
    during it. Records (stage, epoch, ‖x' − x‖∞) per call."""
    real = Stage1.attack
    calls = []

    def guarded(self, model, x, y, ctx, *a, **k):
        before = {id(p): None if p.grad is None else p.grad.clone() for p in model.parameters()}
        out = real(self, model, x, y, ctx, *a, **k)
        for p in model.parameters():
            g0 = before[id(p)]
            assert (p.grad is None) if g0 is None else torch.equal(p.grad, g0), "the attack left a parameter gradient"
        calls.append((self.name, self.epoch, float((out - x).abs().max())))
        return out

    monkeypatch.setattr(Stage1, "attack", guarded)
    return calls


def test_baselines_are_registered_and_validated():
    assert {"lp", "trades", "mart", "fare", "rift", "at", "sft", "genaf"} <= set(method_names())
    assert create_method("trades").cfg["beta"] == 6.0 and create_method("mart").cfg["lam"] == 5.0
    for name in ("at", "genaf-stage1", "genaf", "trades", "mart", "fare", "rift"):
        cfg = create_method(name).cfg
        assert cfg["eps_warmup_epochs"] == 0 and cfg["eps_ramp_epochs"] == 0
        assert (cfg["eps"], cfg["attack_step"], cfg["attack_steps"]) == (EPS, 2 / 255, 10)
        with pytest.raises(ConfigError):
            create_method(name, eps_warmup_epochs=-1)
    with pytest.raises(ConfigError):
        create_method("trades", start="normal")
    with pytest.raises(ConfigError):
        create_method("rift", rift_k=0)
    with pytest.raises(ConfigError):
        create_method("lp", eps=0.1)  # lp has no attack


# ---------------------------------------------------------------- the ε schedule
def test_eps_schedule_values():
    cfg = {"eps": EPS, "attack_step": 2 / 255, "eps_warmup_epochs": 2, "eps_ramp_epochs": 3}
    got = [scheduled_budget(cfg, e) for e in range(7)]
    assert got[:2] == [(0.0, 0.0), (0.0, 0.0)]
    for e, frac in ((2, 0.25), (3, 0.5), (4, 0.75)):
        assert got[e][0] == pytest.approx(EPS * frac) and got[e][1] == pytest.approx(2 / 255 * frac)
    assert got[5] == got[6] == (EPS, 2 / 255)
    off = {"eps": EPS, "attack_step": 2 / 255, "eps_warmup_epochs": 0, "eps_ramp_epochs": 0}
    assert all(scheduled_budget(off, e) == (EPS, 2 / 255) for e in range(3))  # off: the final values exactly


def test_eps_schedule_in_a_fit(tmp_path, small, attack_guard):
    _fit(tmp_path, "at", small, epochs=3, attack_steps=1, warmup_epochs=0, eps_warmup_epochs=1, eps_ramp_epochs=1)
    by_epoch = {}
    for name, epoch, dist in attack_guard:
        assert name == "at"
        by_epoch.setdefault(epoch, []).append(dist)
    assert sorted(by_epoch) == [0, 1, 2]
    assert all(d == 0.0 for d in by_epoch[0])  # warm-up: clean training
    assert all(0 < d <= EPS / 2 + 1e-6 for d in by_epoch[1])  # ramp: eps / 2 (one step of size step / 2)
    assert max(by_epoch[2]) > EPS / 2 + 1e-6 and all(d <= EPS + 1e-6 for d in by_epoch[2])


@pytest.mark.parametrize("name", ["at", "genaf-stage1", "trades", "mart", "fare", "rift"])
def test_adversarial_step_leaves_no_parameter_gradient(name, tiny_data, tiny_encoder, attack_guard):
    """Inside a real step (train mode, stale gradients present as in the Trainer), the attack
    adds nothing to any .grad; while eps is held at 0 there is no perturbation."""
    method = create_method(name, attack_steps=1, eps_warmup_epochs=1)
    stage = [s for s in method.stages() if isinstance(s, Stage1)][-1]
    model = DownstreamModel(tiny_encoder, 10).train()

    class Ctx:
        seed = 0
        reference_encoder = copy.deepcopy(tiny_encoder).eval().requires_grad_(False)

    x, y = tiny_data.train.float_images()[:8], tiny_data.train.labels[:8]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for epoch in (0, 1):
        stage.begin_epoch(epoch)
        losses = stage.step(model, x, y, Ctx())
        assert torch.isfinite(losses["loss"])
    assert [c[1] for c in attack_guard][-1] == 1 and attack_guard[-1][2] > 0
    assert all(c[2] == 0.0 for c in attack_guard if c[1] == 0)
    assert model.training and all(m.training for m in model.modules())


# ---------------------------------------------------------------- lp
def test_lp_leaves_the_encoder_bit_identical(tmp_path, small):
    torch.manual_seed(0)
    start = _state(DownstreamModel(load_encoder("random:demo"), small.num_classes))
    model, _ = _fit(tmp_path, "lp", small, epochs=1)
    after = model.state_dict()
    enc = [k for k in after if k.startswith("encoder.")]
    assert enc and _bn_keys(start)
    assert all(torch.equal(after[k], start[k]) for k in enc)  # parameters and buffers
    assert any(not torch.equal(after[k], start[k]) for k in after if k.startswith("head."))
    assert isinstance(create_method("lp").stages()[0], LinearProbe)


# ---------------------------------------------------------------- trades
def test_trades_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    want = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.0) / 2
    assert float(trades_kl(p.log(), q.log())) == pytest.approx(want, rel=1e-5)
    assert float(trades_kl(p.log() + 3.0, q.log() - 1.0)) == pytest.approx(want, rel=1e-5)  # logits, not probs
    assert float(trades_kl(p.log(), p.log())) == pytest.approx(0.0, abs=1e-7)


def test_trades_fit(tmp_path, small, attack_guard):
    model, art = _fit(tmp_path, "trades", small, **FAST)
    assert attack_guard and all(d <= EPS + 1e-6 for *_, d in attack_guard)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


# ---------------------------------------------------------------- mart
def test_mart_loss_hand_computed():
    p_adv = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    p_nat = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    y = torch.tensor([0, 0])
    # sample 0 is right: top wrong class 1 (0.3); sample 1 is wrong: top wrong class 1 (0.6)
    ce = (-math.log(0.5) - math.log(0.1)) / 2
    boost = (-math.log(1.0001 - 0.3 + 1e-12) - math.log(1.0001 - 0.6 + 1e-12)) / 2

    def kl(p, q):
        return sum(a * math.log(a / (b + 1e-12)) for a, b in zip(p, q))

    weighted = (
        kl([0.7, 0.2, 0.1], [0.5, 0.3, 0.2]) * (1.0000001 - 0.7)
        + kl([0.3, 0.3, 0.4], [0.1, 0.6, 0.3]) * (1.0000001 - 0.3)
    ) / 2
    loss, bce, w = mart_loss(p_nat.log(), p_adv.log(), y, lam=5.0)
    assert float(bce) == pytest.approx(ce + boost, rel=1e-5)
    assert float(w) == pytest.approx(weighted, rel=1e-5)
    assert float(loss) == pytest.approx(ce + boost + 5.0 * weighted, rel=1e-5)


def test_mart_fit(tmp_path, small, attack_guard):
    model, _ = _fit(tmp_path, "mart", small, **FAST)
    assert attack_guard and all(torch.isfinite(v).all() for v in model.state_dict().values())


# ---------------------------------------------------------------- fare
def test_fare_loss_and_labels_unused(tiny_data, tiny_encoder):
    f = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert float(fare_loss(f, t)) == pytest.approx((5.0 + 25.0) / 2)
    assert float(fare_loss(f, t, reduction="sum")) == pytest.approx(30.0)
    cfg = create_method("fare", attack_steps=2).cfg
    model = DownstreamModel(tiny_encoder, 10).train()

    class Ctx:
        seed = 0
        reference_encoder = copy.deepcopy(tiny_encoder).eval().requires_grad_(False)

    x, y = tiny_data.train.float_images()[:8], tiny_data.train.labels[:8]
    out = []
    for labels in (y, torch.flip(y, [0]), torch.zeros_like(y)):  # same model, same attack draws
        out.append(float(FareStage(cfg, 1).step(copy.deepcopy(model), x, labels, Ctx())["loss"].detach()))
    assert out[0] == out[1] == out[2] > 0


def test_fare_fit(tmp_path, small, attack_guard, monkeypatch):
    snaps = {}
    real_setup = LinearProbe.setup

    def setup(self, model, ctx):
        snaps["encoder"], snaps["head"] = _state(model.encoder), _state(model.head)
        return real_setup(self, model, ctx)

    monkeypatch.setattr(LinearProbe, "setup", setup)
    torch.manual_seed(0)
    start = _state(DownstreamModel(load_encoder("random:demo"), small.num_classes))
    model, _ = _fit(tmp_path, "fare", small, epochs=1, attack_steps=1, probe_epochs=1)
    assert attack_guard and {c[0] for c in attack_guard} == {"fare"}
    # stage A moved the encoder only
    assert any(not torch.equal(v, start[f"encoder.{k}"]) for k, v in snaps["encoder"].items())
    assert all(torch.equal(v, start[f"head.{k}"]) for k, v in snaps["head"].items())
    # stage B: the FARE encoder frozen bit-exactly, the head trained
    assert all(torch.equal(v, snaps["encoder"][k]) for k, v in model.encoder.state_dict().items())
    assert any(not torch.equal(v, snaps["head"][k]) for k, v in model.head.state_dict().items())


# ---------------------------------------------------------------- rift
def test_rift_stage_recipe():
    method = create_method("rift")
    names = [s.name for s in method.stages()]
    assert names == ["warmup", "at", "rift"]
    stage = method.stages()[-1]
    assert isinstance(stage, RiftStage) and stage.epochs == 10 and stage.n_selected(23) == 1
    g = stage.optimizer([nn.Parameter(torch.zeros(1))])
    assert (g.optimizer, g.lr, g.momentum, g.weight_decay, g.milestones) == ("sgd", 1e-3, 0.9, 5e-4, [5])


@pytest.mark.parametrize("encoder, n_units", [("random:demo", 23), ("random:vit-tiny", 20)])
def test_rift_changes_only_the_selected_module(tmp_path, small, attack_guard, monkeypatch, encoder, n_units):
    before_evolve = {}
    real_evolve = stage2_common.evolve

    def evolve(model, ctx, evaluate, tolerance, label="evolution"):
        before_evolve.update(_state(model))
        return real_evolve(model, ctx, evaluate, tolerance, label)

    monkeypatch.setattr(stage2_common, "evolve", evolve)
    model, art = _fit(
        tmp_path,
        "rift",
        small,
        encoder=encoder,
        **FAST,
        rift_epochs=2,
        probe_size=16,
        sensitivity_steps=1,
        rift_decay_epoch=1,
    )
    assert {c[0] for c in attack_guard} == {"at"}
    at_state = art["stage1_state"]
    setup = next(v for k, v in art["setup"].items() if k.endswith(":rift"))
    assert len(setup["sensitivity"]) == n_units and len(setup["selected"]) == 1
    (sel,) = setup["selected"]
    assert sel == min(setup["sensitivity"], key=lambda k: (setup["sensitivity"][k], k))
    sel_keys = {f"{sel}.weight", f"{sel}.bias"}
    ft = before_evolve  # the fine-tuned weights (alpha = 1)
    assert not torch.equal(ft[f"{sel}.weight"], at_state[f"{sel}.weight"])
    assert all(torch.equal(v, at_state[k]) for k, v in ft.items() if k not in sel_keys)
    # normalisation frozen bit-exactly: BatchNorm statistics (ResNet), LayerNorm parameters (ViT)
    norm = _bn_keys(ft) + [k for k in ft if k.split(".")[-2].startswith("norm")]
    assert norm and all(torch.equal(ft[k], at_state[k]) for k in norm)
    # the interpolation keeps every untouched tensor bit-exactly and picks an eligible alpha
    fin = next(v for k, v in art["finish"].items() if k.endswith(":rift"))
    assert len(fin["evolution"]) == 11
    chosen = next(r for r in fin["evolution"] if r["alpha"] == fin["alpha"])
    assert chosen["eligible"] and chosen["val_robust"] >= art["stage1_val"]["val_robust"]
    after = model.state_dict()
    assert all(torch.equal(v, at_state[k]) for k, v in after.items() if k not in sel_keys)
    assert all(p.requires_grad for p in model.parameters())
