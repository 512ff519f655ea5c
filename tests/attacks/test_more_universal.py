import pytest
import torch

from genaf.attacks import create_attack
from genaf.attacks.l4a_variants import _WithGaussians, gaussian_images, l4a_fuse_objective, l4a_ugs_objective
from genaf.attacks.sgd_uap import feature_norm
from genaf.attacks.std import dispersion
from genaf.errors import SpecError

EPS = 16 / 255
NAMES = ["l4a-fuse", "l4a-ugs", "std", "sgd-uap"]
ITERS = 12  # sign steps per fit: enough to beat random noise, cheap on a 2-core CPU


def test_plain_objectives_hand_computed():
    a1 = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]]])  # mean of squares 14 / 4 = 3.5
    a2 = torch.tensor([[2.0, -2.0]])  # mean of squares 4
    assert float(l4a_fuse_objective(a1, a2, 0.5)) == pytest.approx(3.5 + 0.5 * 4)
    assert float(l4a_fuse_objective(a1, a2)) == pytest.approx(7.5)
    assert float(l4a_ugs_objective(torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0]]), 2.0)) == pytest.approx(1 + 2 * 9)
    # per-sample population std: [1,3,1,3] -> 1, [2,2,2,2] -> 0, [0,0,0,4] -> sqrt(3); then the batch mean
    a = torch.tensor([[1.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 4.0]]).view(3, 1, 2, 2)
    assert float(dispersion(a)) == pytest.approx((1 + 0 + 3**0.5) / 3)
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]).view(3, 2, 1, 1)  # norms 5, 0, 1
    assert float(feature_norm(f)) == pytest.approx(2.0)


def test_gaussian_images_and_resampling(tiny_data):
    g = gaussian_images(64, 3, 8, 8, torch.Generator().manual_seed(0))
    assert g.shape == (64, 3, 8, 8) and g.min() >= 0 and g.max() <= 1
    means = g.mean((2, 3))
    assert means.min() > 0.37 and means.max() < 0.63
    assert torch.equal(g, gaussian_images(64, 3, 8, 8, torch.Generator().manual_seed(0)))

    class Holder:
        _n_real = None
        ugs_batches = 0

    h = Holder()
    sur = tiny_data.surrogate(16)
    wrapped = _WithGaussians(sur, h, torch.Generator().manual_seed(0), resample_every=2)
    draws = []
    for _ in range(2):
        for xb, _, _ in wrapped.batches(4):
            assert len(xb) == 8 and h._n_real == 4
            draws.append(xb[4:].clone())
    assert h.ugs_batches == 8
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[2], draws[3]) and not torch.equal(draws[3], draws[4])


@pytest.mark.parametrize("name", NAMES)
def test_attack_budget_objective_and_seed(name, tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(64)
    att = create_attack(name, tiny_encoder, eps=EPS, iterations=ITERS, batch_size=32)
    p = att.fit(sur)
    assert p.attack == name and p.linf() <= EPS + 1e-6
    x = tiny_data.test.float_images()[:16]
    xa = p.apply(x)
    assert xa.min() >= 0 and xa.max() <= 1 and (xa - x).abs().max() <= EPS + 1e-6
    held = sur.subset(16)  # score on 16 images: 100 random baselines stay cheap on a 2-core CPU
    fitted = att.score(p.delta, held)
    g = torch.Generator().manual_seed(0)
    randoms = [att.score((torch.rand(p.delta.shape, generator=g) * 2 - 1) * EPS, held) for _ in range(100)]
    assert fitted > max(randoms)
    p2 = create_attack(name, tiny_encoder, eps=EPS, iterations=ITERS, batch_size=32).fit(sur)
    assert torch.equal(p.delta, p2.delta)


@pytest.mark.parametrize("name", NAMES)
def test_presets_keep_eps(name, tiny_encoder):
    from genaf.attacks.base import _ATTACKS

    presets = _ATTACKS[name].presets
    assert set(presets) == {"paper", "cpu"} and presets["paper"]["eps"] == presets["cpu"]["eps"]
    assert create_attack(name, tiny_encoder, preset="paper").eps == presets["paper"]["eps"]


@pytest.mark.parametrize(("name", "key"), [(n, "layer") for n in NAMES] + [("l4a-fuse", "layer2")])
def test_unknown_layer_lists_available(name, key, tiny_encoder):
    with pytest.raises(SpecError, match="layer1.0.conv1"):
        create_attack(name, tiny_encoder, eps=EPS, **{key: "layer9"})
