import math

import pytest
import torch
from torch import nn

from genaf.attacks import create_attack
from genaf.attacks.base import _ATTACKS
from genaf.attacks.sgd_uap import clipped_ce
from genaf.attacks.surrogate_head import fit_surrogate_head, kmeans, margin_loss
from genaf.attacks.uap import deepfool
from genaf.errors import ConfigError, SpecError

EPS = 10 / 255
# small fits (a few seconds each on one CPU thread) that still beat random noise clearly
UAP_CFG = {"images": 24, "max_passes": 1, "head_images": 96}
SGD_CFG = {"objective": "clipped-ce", "iterations": 24, "batch_size": 32, "head_images": 96}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_kmeans_two_blobs():
    pts = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])
    centres, labels = kmeans(pts, 2, torch.Generator().manual_seed(3), iters=20)
    assert labels[0] == labels[1] == labels[2] and labels[3] == labels[4] == labels[5] and labels[0] != labels[3]
    low, high = centres[labels[0]], centres[labels[3]]
    assert torch.allclose(low, torch.tensor([1 / 3, 1 / 3])) and torch.allclose(high, torch.tensor([31 / 3, 31 / 3]))
    again = kmeans(pts, 2, torch.Generator().manual_seed(3), iters=20)
    assert torch.equal(centres, again[0]) and torch.equal(labels, again[1])
    one, lab1 = kmeans(pts, 1, torch.Generator().manual_seed(0))
    assert torch.allclose(one[0], pts.mean(0)) and int(lab1.max()) == 0
    same, _ = kmeans(torch.zeros(4, 3), 2, torch.Generator().manual_seed(0))  # coincident points do not crash
    assert torch.equal(same, torch.zeros(2, 3))
    with pytest.raises(ConfigError):
        kmeans(pts, 7, torch.Generator())


def test_clipped_ce_and_margin_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    y = torch.tensor([0, 1])
    ce1 = math.log(1 + math.exp(10.0))  # CE of the second row, about 10.0000454
    assert float(clipped_ce(logits, y, 12.0)) == pytest.approx((math.log(2) + ce1) / 2)
    assert float(clipped_ce(logits, y, 5.0)) == pytest.approx((math.log(2) + 5.0) / 2)
    # margins: max other − own = 2 − 3 = −1 and 5 − 0 = 5
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert float(margin_loss(z, torch.tensor([0, 0]))) == pytest.approx(2)


class _Linear2(nn.Module):
    """logits = (a·x₀ + b, x₁) on (N, 1, 1, 2) images."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[a, 0.0], [0.0, 1.0]]))
            self.lin.bias.copy_(torch.tensor([b, 0.0]))

    def forward(self, x):
        return self.lin(x.flatten(1))


@pytest.mark.parametrize(
    ("norm", "x", "a", "b", "step"),
    [
        # f = 0.4 − 0.6 = −0.2, w = (−2, 1): ℓ2 step 0.2001/5·w, ℓ∞ step 0.2001/3·sign(w)
        ("l2", [0.3, 0.4], 2.0, 0.0, [-0.2001 * 2 / 5, 0.2001 / 5]),
        ("linf", [0.3, 0.4], 2.0, 0.0, [-0.2001 / 3, 0.2001 / 3]),
        # x₀ sits at 0 and cannot go down: only x₁ moves, by (0.1 + 1e-4)/1
        ("linf", [0.0, 0.4], 1.0, 0.5, [0.0, 0.1001]),
    ],
)
def test_deepfool_on_a_linear_model(norm, x, a, b, step):
    model = _Linear2(a, b)
    img = torch.tensor(x).view(1, 1, 1, 2)
    r, fooled, iters = deepfool(model, img, 0, top_k=2, overshoot=0.02, max_iter=10, norm=norm)
    assert fooled and iters == 1
    assert torch.allclose(r.flatten(), 1.02 * torch.tensor(step), atol=1e-6)
    assert int(model((img + r).clamp(0, 1)).argmax()) == 1
    assert all(p.grad is None for p in model.parameters())
    r0, fooled0, it0 = deepfool(model, img, 1, top_k=2, norm=norm)  # already off label 1
    assert fooled0 and it0 == 0 and not r0.any()


@pytest.mark.parametrize("kind", ["kmeans", "probe"])
def test_surrogate_head(kind, tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(48)
    head = fit_surrogate_head(tiny_encoder, sur, kind=kind, n_classes=4, seed=1)
    again = fit_surrogate_head(tiny_encoder, sur, kind=kind, n_classes=4, seed=1)
    assert torch.equal(head.linear.weight, again.linear.weight) and torch.equal(head.linear.bias, again.linear.bias)
    logits = head(tiny_encoder(sur.float_images()[:5]))
    n = 4 if kind == "kmeans" else int(sur.labels.max()) + 1
    assert logits.shape == (5, n) and head.kind == kind and head.train_accuracy >= 0.9
    assert not head.training and all(not p.requires_grad and p.grad is None for p in head.parameters())
    with pytest.raises(SpecError):
        fit_surrogate_head(tiny_encoder, sur, kind="oracle")


def _check_fit(att, p, tiny_data, sur, name):
    """Budget, [0,1] output, score beats random noise, no parameter gradients."""
    assert p.attack == name and p.linf() <= EPS + 1e-6 and p.eps == EPS
    assert att.seconds > 0 and att.images_seen > 0 and len(att.history) > 0
    x = tiny_data.test.float_images()[:16]
    xa = p.apply(x)
    assert xa.min() >= 0 and xa.max() <= 1 and (xa - x).abs().max() <= EPS + 1e-6
    held = tiny_data.val.subset(32)  # images neither the head nor δ saw
    fitted = att.score(p.delta, held)
    g = torch.Generator().manual_seed(0)
    randoms = [att.score((torch.rand(p.delta.shape, generator=g) * 2 - 1) * EPS, held) for _ in range(100)]
    assert fitted > max(randoms)
    assert all(q.grad is None for q in att.encoder.parameters())
    assert all(q.grad is None for q in att.head.parameters())


def test_uap_fit(tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(96)
    att = create_attack("uap", tiny_encoder, **UAP_CFG)
    with pytest.raises(ConfigError, match="no surrogate head"):
        att.score(torch.zeros(1, 3, 28, 28), sur)
    p = att.fit(sur)
    _check_fit(att, p, tiny_data, sur, "uap")
    assert att.images_seen == UAP_CFG["images"] and 0 <= att.history[-1] <= 1
    assert att.fooling_rate(p.delta, sur.subset(UAP_CFG["images"])) == pytest.approx(att.history[-1])
    assert p.config["head"] == "kmeans" and p.config["preset"] == "cpu"
    p2 = create_attack("uap", tiny_encoder, **UAP_CFG).fit(sur)
    assert torch.equal(p.delta, p2.delta)


def test_uap_l2_deepfool_and_probe_head(tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(48)
    att = create_attack("uap", tiny_encoder, deepfool="l2", head="probe", **dict(UAP_CFG, images=6))
    p = att.fit(sur)
    assert p.linf() <= EPS + 1e-6 and att.head.kind == "probe"
    with pytest.raises(SpecError):
        create_attack("uap", tiny_encoder, deepfool="l1")


def test_sgd_uap_clipped_ce_fit(tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(96)
    att = create_attack("sgd-uap", tiny_encoder, **SGD_CFG)
    p = att.fit(sur)
    _check_fit(att, p, tiny_data, sur, "sgd-uap")
    assert all(0 <= h <= att.beta for h in att.history)
    p2 = create_attack("sgd-uap", tiny_encoder, **SGD_CFG).fit(sur)
    assert torch.equal(p.delta, p2.delta)
    probe = create_attack("sgd-uap", tiny_encoder, **dict(SGD_CFG, head="probe", iterations=2))
    assert probe.fit(sur).linf() <= EPS + 1e-6 and probe.head.kind == "probe"


def test_sgd_uap_options(tiny_encoder):
    att = create_attack("sgd-uap", tiny_encoder)
    assert att.objective_name == "layer-norm" and att.head is None
    with pytest.raises(SpecError):
        create_attack("sgd-uap", tiny_encoder, objective="ce")
    with pytest.raises(SpecError):
        create_attack("sgd-uap", tiny_encoder, head="oracle")
    with pytest.raises(ConfigError):
        create_attack("sgd-uap", tiny_encoder, beta=0)


@pytest.mark.parametrize("name", ["uap", "sgd-uap"])
def test_presets_keep_eps_and_keys(name, tiny_encoder):
    presets = _ATTACKS[name].presets
    assert set(presets) == {"paper", "cpu"} and set(presets["paper"]) == set(presets["cpu"])
    assert presets["paper"]["eps"] == presets["cpu"]["eps"] == EPS
    assert create_attack(name, tiny_encoder, preset="paper").eps == EPS
    if name == "sgd-uap":
        assert presets["paper"]["objective"] == "layer-norm" and presets["paper"]["beta"] == 12
    else:
        assert presets["paper"]["target_fooling"] == 0.8 and presets["paper"]["head"] == "kmeans"
        assert presets["paper"]["overshoot"] == 0.02
