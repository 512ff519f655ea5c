"""``genaf.fold``: the BatchNorm-folded copy that the training attacks run on.

Tolerance. The folded and the unfolded model compute the same real function; they differ only in
float32 rounding (unit roundoff 6e-8), which a ResNet's ~20 layers amplify to about 1e-7 of the
output's scale (measured: 9e-8 on the logits, 1.5e-8 on input gradients of size 2e-2). The
checks allow 1e-4 relative and 1e-5 of the largest value: about 1000× that rounding, and far
below what a wrong fold gives — a BatchNorm dropped, applied twice or with stale statistics
changes the output by O(1) relative, which ``test_a_stale_copy_is_caught`` shows the same check
rejecting.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genaf.encoders import load_encoder
from genaf.fold import AttackFold, find_conv_bn_pairs
from genaf.methods.base import Context, create_method
from genaf.methods.genaf import Stage1
from genaf.models import DownstreamModel
from genaf.train import TrainConfig, Trainer
from genaf.utils import generator

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-5 * float(want.abs().max()))


def _nontrivial_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity (as after pre-training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _logits_and_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    xa = x.clone().requires_grad_(True)
    logits = model(xa)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xa)
    return logits.detach(), g


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _check_fold(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pairs: int) -> AttackFold:
    model.eval()
    before = _state(model)
    fold = AttackFold(model)
    assert len(fold.pairs) == pairs, fold.pairs
    attacked = fold(model)
    assert attacked is fold.copy and attacked is not model
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in attacked.modules()) == n_bn - pairs
    want_z, want_g = _logits_and_input_grad(model, x, y)
    got_z, got_g = _logits_and_input_grad(attacked, x, y)
    _close(got_z, want_z)
    _close(got_g, want_g)
    # the trained module: bit-identical state, no gradient left, and nothing shared with the copy
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    src = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    dst = {t.untyped_storage().data_ptr() for t in [*attacked.parameters(), *attacked.buffers()]}
    assert not src & dst
    assert not attacked.training and not any(p.requires_grad for p in attacked.parameters())
    return fold


def test_genaf_resnet_folds_exactly(tiny_data):
    torch.manual_seed(0)
    model = _nontrivial_bn(DownstreamModel(load_encoder("random:demo"), 10))
    x, y = tiny_data.train.float_images()[:8], tiny_data.train.labels[:8]
    _check_fold(model, x, y, pairs=20)  # stem + 16 in the blocks + 3 downsample convolutions


def test_torchvision_resnet18_folds_exactly():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _nontrivial_bn(torchvision.models.resnet18(num_classes=10))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _check_fold(model, x, torch.tensor([3, 7]), pairs=20)


def test_timm_resnet_with_a_deep_stem_folds_exactly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _nontrivial_bn(timm.create_model("resnet10t", pretrained=False, num_classes=10))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _check_fold(model, x, torch.tensor([1, 2]), pairs=14)


def test_a_stale_copy_is_caught_and_refresh_follows_the_update(tiny_data):
    """The copy is redone from the trained module at every use: after an optimiser step and a
    train-mode forward (new running statistics) it matches again; the copy as it was before the
    update does not, by far more than the tolerance."""
    torch.manual_seed(0)
    model = _nontrivial_bn(DownstreamModel(load_encoder("random:demo"), 10))
    x, y = tiny_data.train.float_images()[:8], tiny_data.train.labels[:8]
    fold = AttackFold(model)
    fold(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()
    want, _ = _logits_and_input_grad(model, x, y)
    stale, _ = _logits_and_input_grad(fold.copy, x, y)
    assert (stale - want).abs().max() > 100 * (RTOL * want.abs().max())
    got, _ = _logits_and_input_grad(fold(model), x, y)
    _close(got, want)


def test_channels_last_is_kept():
    torch.manual_seed(0)
    model = DownstreamModel(load_encoder("random:demo"), 10).to(memory_format=torch.channels_last)
    fold = AttackFold(_nontrivial_bn(model))
    for conv, _ in fold.pairs:
        assert fold(model).get_submodule(conv).weight.is_contiguous(memory_format=torch.channels_last)


class _ConvReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        return self.bn(z) + z  # the conv's output is read by something besides the BatchNorm


class _BNSubclass(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.bn(self.conv(x))
        return z if x.sum() > 0 else -z  # data-dependent control flow: torch.fx cannot trace it


@pytest.mark.parametrize(
    "build, note",
    [
        (_ConvReadTwice, "no Conv2d"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _BNSubclass(4)), "no Conv2d"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), "no Conv2d"),
        (_Untraceable, "not traceable"),
        (lambda: load_encoder("random:vit-tiny"), "no BatchNorm2d"),
    ],
    ids=["conv-read-twice", "bn-subclass", "no-running-stats", "untraceable", "vit"],
)
def test_what_is_not_recognised_is_left_alone(build, note):
    torch.manual_seed(0)
    model = build().eval()
    pairs, why = find_conv_bn_pairs(model)
    assert pairs == [] and note in why
    fold = AttackFold(model)
    assert fold.copy is None and fold(model) is model


def test_a_conv_with_a_hook_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model[2].register_forward_hook(lambda *_: None)
    assert find_conv_bn_pairs(model)[0] == [("0", "1")]


def test_attack_with_and_without_the_fold(tiny_data):
    """The training attack on the folded copy against the attack on the trained module, from the
    same random start: identical up to sign flips of gradient components at rounding level (the
    measured fraction of differing pixels is 0 for K ≤ 3 here), the same loss reached, and the
    trained module untouched."""
    torch.manual_seed(0)
    model = _nontrivial_bn(DownstreamModel(load_encoder("random:demo"), 10)).train()
    x, y = tiny_data.train.float_images()[:32], tiny_data.train.labels[:32]
    before = _state(model)
    cfg = create_method("at", attack_steps=3).cfg
    adv = []
    for fold in (None, AttackFold(model)):
        stage = Stage1(cfg, 1, name="at")
        stage._gen = generator(0, "fold-test")
        adv.append(stage.attack(model, x, y, Context(None, torch.device("cpu"), 0, None, print, attack_fold=fold)))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    differ = ((adv[0] - adv[1]).abs() > 1e-6).float().mean()
    assert differ <= 1e-3, float(differ)
    with torch.no_grad():
        model.eval()
        loss = [F.cross_entropy(model(a), y) for a in adv]
    torch.testing.assert_close(loss[1], loss[0], rtol=1e-3, atol=0)


@pytest.fixture(scope="module")
def small(tiny_data):
    return dataclasses.replace(tiny_data, train=tiny_data.train.subset(32), val=tiny_data.val.subset(16))


def test_trainer_attacks_the_folded_copy_and_records_it(tmp_path, small, monkeypatch):
    """With ``fold_bn`` (the default) the Trainer attacks the folded copy, records what it folded,
    and counts the attack passes as before; ``fold_bn: false`` attacks the module itself. The two
    runs' first adversarial batch (same weights, same data, same draws) agrees to float rounding.

    Later steps are not compared weight by weight: Adam's update is close to ±lr for a parameter
    whose gradient is at rounding level (a BatchNorm bias at initialisation), so one rounding-level
    difference flips it; on some CPUs the two runs' BatchNorm biases differ by ~10 % after one
    epoch with both attacks correct. The trained models are compared by their validation loss."""
    runs, real, real_attack = {}, Stage1.attacked_model, Stage1.attack
    for fold_bn in (True, False):
        torch.manual_seed(0)
        model = DownstreamModel(load_encoder("random:demo"), small.num_classes)
        cfg = TrainConfig(batch_size=16, n_val_robust=8, val_steps=1, augment=False, progress=False, fold_bn=fold_bn)
        method = create_method("at", epochs=1, attack_steps=2, warmup_epochs=0)
        trainer = Trainer(model, small, method, cfg, tmp_path / str(fold_bn), torch.device("cpu"), log=lambda *_: None)
        seen: list[bool] = []
        first: list[torch.Tensor] = []

        def spy(self, m, ctx, _seen=seen):
            out = real(self, m, ctx)
            _seen.append(out is not m)
            return out

        def spy_attack(self, m, x, y, ctx, *args, _first=first, **kw):
            out = real_attack(self, m, x, y, ctx, *args, **kw)
            if not _first:
                _first.append((x.detach().clone(), out.detach().clone()))
            return out

        monkeypatch.setattr(Stage1, "attacked_model", spy)
        monkeypatch.setattr(Stage1, "attack", spy_attack)
        trainer.fit()
        monkeypatch.undo()
        runs[fold_bn] = (model, trainer.attack_fold, trainer.budget(), seen, first[0])
    (on, info_on, budget_on, seen_on, adv_on), (off, info_off, budget_off, seen_off, adv_off) = runs[True], runs[False]
    assert info_on == {"fold_bn": True, "folded_pairs": 20}
    assert info_off == {"fold_bn": False, "folded_pairs": 0}
    assert seen_on and all(seen_on) and seen_off and not any(seen_off)
    assert budget_on["encoder_passes_per_train_image"] == budget_off["encoder_passes_per_train_image"]
    # the first adversarial batch: the same as without the fold up to rounding (as in the unit test above)
    (x_on, adv_on), (x_off, adv_off) = adv_on, adv_off
    assert torch.equal(x_on, x_off) and 0 < float((adv_on - x_on).abs().max()) <= 8 / 255 + 1e-6
    differ = ((adv_on - adv_off).abs() > 1e-6).float().mean()
    assert differ <= 1e-3, float(differ)
    # the trained models: the same validation loss to 1e-3 (a wrong fold trains on other examples)
    x, y = small.val.float_images(), small.val.labels
    with torch.no_grad():
        loss = [F.cross_entropy(m.eval()(x), y) for m in (on, off)]
    torch.testing.assert_close(loss[0], loss[1], rtol=1e-3, atol=0)


def test_fold_is_off_under_compile():
    cfg = TrainConfig(compile="default", progress=False)
    trainer = Trainer(nn.Linear(2, 2), None, create_method("at"), cfg, "unused", torch.device("cpu"))
    trainer._build_fold()
    assert trainer.fold is None and "compile" in trainer.attack_fold["note"]


def test_evaluation_attacks_the_folded_copy_and_scores_the_model(tiny_data):
    """``evaluate_model`` runs its white-box attacks and the self-checks' PGD on the folded copy
    (the default) and scores the model's own predictions: against ``fold_bn=False`` the clean
    predictions are identical and the white-box ones agree up to rounding-level flips, the record
    says what was folded, and the model is left as it was (weights, buffers, train mode)."""
    from genaf.evaluation import evaluate_model

    torch.manual_seed(0)
    model = _nontrivial_bn(DownstreamModel(load_encoder("random:demo"), 10)).train()
    before = _state(model)
    wb = {"eps": 8 / 255, "step": 2 / 255, "steps": 3, "restarts": 1, "fgsm": True}
    test = tiny_data.test.subset(64)
    runs = {
        fold: evaluate_model(model, test, whitebox=wb, batch_size=32, n_check=32, fold_bn=fold)
        for fold in (True, False)
    }
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    on, off = runs[True], runs[False]
    for name in ("pgd3-wb", "fgsm-wb", "checks"):
        entry = on["metrics"]["checks"] if name == "checks" else on["metrics"]["attacks"][name]
        assert entry["attack_fold"] == {"fold_bn": True, "folded_pairs": 20}, name
        entry = off["metrics"]["checks"] if name == "checks" else off["metrics"]["attacks"][name]
        assert entry["attack_fold"] == {"fold_bn": False, "folded_pairs": 0}, name
    assert on["per_sample"]["clean"] == off["per_sample"]["clean"]
    for name in ("pgd3-wb", "fgsm-wb"):
        a, b = torch.tensor(on["per_sample"][name]), torch.tensor(off["per_sample"][name])
        assert float((a != b).float().mean()) <= 2 / 64, name  # at most a flip or two at a decision boundary
        assert abs(on["metrics"]["robust_acc"][name] - off["metrics"]["robust_acc"][name]) <= 2 / 64
    assert on["metrics"]["robust_acc"]["pgd3-wb"] < on["metrics"]["clean_acc"]  # the attack did something
    c_on, c_off = on["metrics"]["checks"], off["metrics"]["checks"]
    # (a random-weight model answers nearly one class: prediction_collapse fails on both alike)
    assert c_on["failed"] == c_off["failed"] and c_on["pgd_loss_rises"]["passed"]
    assert c_on["whitebox_key"] != c_off["whitebox_key"]
    for e, acc in c_off["whitebox_curve"].items():
        assert abs(c_on["whitebox_curve"][e] - acc) <= 1 / 32, e
