"""Smoke tests that check the invariants of each method on tiny real data."""

import json

import pytest
import torch
from torch import nn

from _tiny import tiny_resnet
from genaf.api import finetune
from genaf.errors import ConfigError, SpecError
from genaf.methods.base import create_method
from genaf.methods.genaf import Stage1
from genaf.models import DownstreamModel, load_model

TINY_TRAIN = {"batch_size": 64, "n_val_robust": 32, "val_steps": 1, "augment": False, "keep_checkpoint": True}
TINY_DATA = {"n_train": 192, "n_val": 96, "n_test": 96}


def _run(tmp_path, method, tiny_data, encoder="random:demo", **mc):
    out = tmp_path / method
    m = finetune(
        encoder,
        "fashion-mnist",
        method,
        out,
        method_config=mc,
        train=dict(TINY_TRAIN),
        data=dict(TINY_DATA),
        datamodule=tiny_data,
        log=lambda *_: None,
    )
    return out, m


def test_sft_trains_every_parameter(tmp_path, tiny_data):
    out, m = _run(tmp_path, "sft", tiny_data, epochs=1)
    model = load_model(out)
    start = torch.load(out / "checkpoint.pt", weights_only=True)["artifacts"]["reference_encoder"]
    changed = [
        k for k, v in model.encoder.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])
    ]
    assert len(changed) == len([k for k, v in start.items() if v.is_floating_point()])
    assert 0 <= m["clean_acc"] <= 1 and "pgd10-wb" in m["robust_acc"]
    for f in ("model.safetensors", "model.json", "config.yaml", "metrics.json", "history.json"):
        assert (out / f).is_file()


# units: the ResNet's 20 convolutions + the head's 3 Linear layers; the ViT's patch-embedding
# convolution, 4 blocks x (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and the head's 3 Linear layers
STAGE2_UNITS = {"random:demo": 23, "random:vit-tiny": 1 + 4 * 4 + 3}


@pytest.mark.parametrize("encoder", list(STAGE2_UNITS))
def test_genaf_stage2_changes_only_selected_layers(tmp_path, tiny_data, encoder):
    out, m = _run(
        tmp_path,
        "genaf",
        tiny_data,
        encoder=encoder,
        epochs=1,
        attack_steps=1,
        warmup_epochs=0,
        stage2_epochs=1,
        probe_size=32,
        sensitivity_steps=2,
        sensitivity_fraction=1.0,
        evolution=False,
        stage2_k=3,
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    before = ckpt["artifacts"]["stage1_state"]
    after = load_model(out).state_dict()
    sens = json.loads((out / "sensitivity.json").read_text())
    selected = sens["selected"]
    assert len(selected) == 3 and len(sens["sensitivity"]) == STAGE2_UNITS[encoder]
    if encoder == "random:vit-tiny":
        blocks = {
            f"encoder.backbone.blocks.{i}.{u}"
            for i in range(4)
            for u in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        }
        assert blocks | {"encoder.backbone.patch_embed.proj"} <= set(sens["sensitivity"])
        assert not any("norm" in k for k in sens["sensitivity"])  # LayerNorm is never a unit
    # the saved dictionary holds the values of the definition, recomputed here independently
    expected = _naive_sensitivity(
        before, tiny_data, probe_size=32, steps=2, eta=sens["eta"], step_size=sens["step_size"], encoder=encoder
    )
    assert set(expected) == set(sens["sensitivity"])
    for name, rho in expected.items():
        assert sens["sensitivity"][name] == pytest.approx(rho, rel=1e-2, abs=1e-5), name  # float32 sums
    # the selected layers are the 3 with the lowest robust sensitivity
    ranked = sorted(sens["sensitivity"], key=lambda k: sens["sensitivity"][k])
    assert set(selected) == set(ranked[:3])
    sel_params = {f"{n}.{p}" for n in selected for p in ("weight", "bias")}
    model = DownstreamModel.__new__(DownstreamModel)  # noqa: F841 (only names are needed below)
    for k, v in after.items():
        if k in sel_params and k.endswith("weight"):
            assert not torch.equal(v, before[k]), f"selected {k} did not change"
        elif k not in sel_params:
            assert torch.equal(v, before[k]), f"{k} changed in stage 2 but is not selected"
    # normalisation layers are frozen bit-exactly: BatchNorm statistics, LayerNorm affine parameters
    norm_keys = [k for k in after if "running_" in k or "num_batches_tracked" in k or "norm" in k.split(".")[-2]]
    assert norm_keys and all(torch.equal(after[k], before[k]) for k in norm_keys)
    if encoder == "random:vit-tiny":  # and so are the position embedding and the class token
        assert all(torch.equal(after[k], before[k]) for k in after if k.endswith(("pos_embed", "cls_token")))


def test_genaf_stage2_layers_fine_tunes_exactly_the_named_layers(tmp_path, tiny_data, tiny_encoder, monkeypatch):
    from genaf.methods import stage2_common
    from genaf.train import TrainConfig, Trainer

    def no_scoring(*a, **k):
        raise AssertionError("robust_sensitivity ran although stage2_layers names the layers")

    monkeypatch.setattr(stage2_common, "robust_sensitivity", no_scoring)
    # three layers instead of the k = 2 asked for, one of them in the head (weight and bias)
    given = ["encoder.backbone.conv1", "encoder.backbone.layer4.1.conv2", "head.0"]
    meth = create_method("genaf", epochs=0, warmup_epochs=0, stage2_epochs=1, stage2_k=2, stage2_layers=given)
    model = DownstreamModel(tiny_encoder, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(batch_size=64, n_val_robust=16, val_steps=1, augment=False, device="cpu", progress=False)
    artifacts = Trainer(model, tiny_data, meth, cfg, tmp_path, torch.device("cpu"), log=lambda *_: None).fit()
    assert artifacts["setup"]["stage1:stage2"] == {"selected": given, "k": 3, "given": True}
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(given)  # weights (and the head's bias) of exactly those; BatchNorm untouched


def test_stage2_layers_are_checked_before_training(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="list of layer names"):
        create_method("genaf", stage2_layers="head.3")
    with pytest.raises(ConfigError, match="more than once"):
        create_method("genaf", stage2_layers=["head.3", "head.3"])
    with pytest.raises(ConfigError, match=r"\['head.9'\] not among the model's 23"):
        _run(tmp_path, "genaf", tiny_data, epochs=1, stage2_layers=["head.3", "head.9"])
    assert not (tmp_path / "genaf" / "history.json").exists()


def _naive_sensitivity(state, data, probe_size, steps, eta, step_size=0.5, seed=0, encoder="random:demo"):
    """ρ of every Conv2d/Linear weight by the definition, one layer at a time, written without
    genaf's shared first step: the stage's own probe recipe (PGD with the run's K, ε, step and
    random start on the first ``probe_size`` validation images); then
    ``steps`` normalised ascent steps of ``step_size``·η‖W‖ on that layer alone, projected onto
    ‖ΔW‖ ≤ η‖W‖ after each, the largest whole-probe loss seen minus the unperturbed one."""
    import torch.nn.functional as F

    from genaf.attacks.whitebox import pgd
    from genaf.encoders import load_encoder
    from genaf.methods.genaf import GENAF_DEFAULTS
    from genaf.utils import generator

    model = DownstreamModel(load_encoder(encoder), data.num_classes)
    model.load_state_dict(state)
    model.eval()
    val = data.val.subset(probe_size)
    xs, ys = val.float_images(), val.labels
    c = GENAF_DEFAULTS
    step = c["fast_step_factor"] * c["eps"]  # the run uses K = 1 (fast mode): FGSM-RS probe
    xa = pgd(model, xs, ys, c["eps"], step, 1, random_start=True, gen=generator(seed, "stage2:probe"))
    for p in model.parameters():
        p.requires_grad_(False)

    def loss_of():
        with torch.no_grad():
            return float(F.cross_entropy(model(xa), ys))

    base = loss_of()
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        w = mod.weight
        w0 = w.detach().clone()
        radius = eta * float(w0.norm())
        d = torch.zeros_like(w0)
        best = base
        for k in range(steps):
            with torch.no_grad():
                w.copy_(w0 + d)
            w.requires_grad_(True)
            loss = F.cross_entropy(model(xa), ys)
            (g,) = torch.autograd.grad(loss, w)
            w.requires_grad_(False)
            if k > 0:
                best = max(best, float(loss.detach()))
            d = d + step_size * radius * g / g.norm()
            if float(d.norm()) > radius:
                d = d * (radius / float(d.norm()))
        with torch.no_grad():
            w.copy_(w0 + d)
        best = max(best, loss_of())
        with torch.no_grad():
            w.copy_(w0)
        out[name] = best - base
    return out


def test_attack_leaves_no_parameter_gradient(tiny_data, tiny_encoder):
    model = DownstreamModel(tiny_encoder, 10)
    model.train()
    stage = Stage1(create_method("at").cfg, 1, name="at")
    x = tiny_data.train.float_images()[:16]
    y = tiny_data.train.labels[:16]

    class Ctx:
        seed = 0

    xa = stage.attack(model, x, y, Ctx())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1


def test_genaf_roles_and_options_are_validated():
    with pytest.raises(ConfigError):
        create_method("genaf", space="logits", target="pretrained")
    with pytest.raises(ConfigError):
        create_method("genaf", lamda=3)
    with pytest.raises(SpecError):
        create_method("gen-af")
    ref = create_method(
        "genaf",
        lam=20.0,
        reduction="sum",
        space="logits",
        student="clean",
        target="adversarial",
        detach_target=False,
        detach_weights=False,
    )
    assert ref.cfg["lam"] == 20.0


@pytest.mark.parametrize(
    "roles",
    [
        {"space": "logits", "student": "clean", "target": "adversarial", "detach_target": False, "reduction": "sum"},
        {"space": "features", "student": "adversarial", "target": "pretrained", "reduction": "mean"},
        {"space": "features", "student": "adversarial", "target": "clean", "forward": "concat"},
    ],
)
def test_stage1_step_roles(tiny_data, tiny_encoder, roles):
    import copy

    cfg = create_method("genaf-stage1", attack_steps=1, lam=1.0, **roles).cfg
    model = DownstreamModel(tiny_encoder, 10).train()
    stage = Stage1(cfg, 1)

    class Ctx:
        seed = 0
        reference_encoder = copy.deepcopy(tiny_encoder).eval()

    x, y = tiny_data.train.float_images()[:16], tiny_data.train.labels[:16]
    losses = stage.step(model, x, y, Ctx())
    assert set(losses) >= {"loss", "ce_adv", "genetic"}
    assert torch.isfinite(losses["loss"]) and float(losses["genetic"]) >= 0
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_resume_after_a_crash_gives_the_same_metrics(tmp_path, tiny_data, monkeypatch):
    mc = dict(epochs=2, attack_steps=1, warmup_epochs=0, stage2_epochs=1, probe_size=32, sensitivity_steps=1)
    enc = tiny_resnet(tmp_path)  # width 4: resuming is the subject, not the encoder
    _, full = _run(tmp_path / "a", "genaf", tiny_data, encoder=enc, **mc)

    from genaf import train as train_mod

    real = train_mod.Trainer._save
    calls = {"n": 0}

    def crashing_save(self, *a, **k):
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 1:  # right after the first epoch's checkpoint
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train_mod.Trainer, "_save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", "genaf", tiny_data, encoder=enc, **mc)
    monkeypatch.setattr(train_mod.Trainer, "_save", real)
    out = tmp_path / "b" / "genaf"
    resumed = finetune(
        enc,
        "fashion-mnist",
        "genaf",
        out,
        method_config=mc,
        train=dict(TINY_TRAIN),
        data=dict(TINY_DATA),
        datamodule=tiny_data,
        resume=True,
        log=lambda *_: None,
    )
    assert resumed["clean_acc"] == full["clean_acc"]
    assert resumed["robust_acc"] == full["robust_acc"]
    a = load_model(tmp_path / "a" / "genaf").state_dict()
    b = load_model(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_head_shape(tiny_encoder):
    model = DownstreamModel(tiny_encoder, 7)
    lin = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(128, 128), (128, 128), (128, 7)]


def test_bf16_autocast_and_channels_last_paths_run_on_cpu(tmp_path, tiny_data):
    out = tmp_path / "bf16"
    m = finetune(
        "random:demo",
        "fashion-mnist",
        "genaf",
        out,
        method_config=dict(
            epochs=1, attack_steps=1, warmup_epochs=0, stage2_epochs=1, probe_size=32, sensitivity_steps=1
        ),
        train=dict(TINY_TRAIN, amp="bf16", channels_last=True),
        data=dict(TINY_DATA),
        datamodule=tiny_data,
        log=lambda *_: None,
    )
    assert 0 <= m["clean_acc"] <= 1 and all(torch.isfinite(v).all() for v in load_model(out).state_dict().values())
