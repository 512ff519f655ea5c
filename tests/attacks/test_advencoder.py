import math

import pytest
import torch

from genaf.attacks import Perturbation, create_attack
from genaf.attacks.advencoder import (
    LOCATIONS,
    advencoder_loss,
    effective_radius,
    frequency_penalty,
    high_pass,
    info_nce,
    patch_mask,
    patch_origin,
)
from genaf.attacks.base import _ATTACKS
from genaf.errors import ConfigError, SpecError

EPS = 10 / 255
NAMES = ["advencoder", "advencoder-patch"]
# Adam steps per fit and images per batch: enough to beat random perturbations, cheap on 2 cores.
FAST = {"iterations": 12, "batch_size": 16}


# --- the plain functions, against hand-computed values ------------------------------------


def test_info_nce_hand_computed():
    # orthogonal unit features, positives on the diagonal: each row's logits are (1/τ, 0), so
    # the cross-entropy is log(1 + e^{-1/τ}); feature scale does not matter (cosine similarity)
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    assert float(info_nce(a, b, 1.0)) == pytest.approx(math.log(1 + math.exp(-1)))
    assert float(info_nce(a, b, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)))
    # swapped positives: each row's logits are (0, 1/τ), the right one is the smaller
    assert float(info_nce(a, b.flip(0), 1.0)) == pytest.approx(math.log(1 + math.e))
    # a 45° pair: cosines row 0 (1, 1/√2), row 1 (0, 1/√2) with τ = 1
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.e / (math.e + math.exp(s)))
    row1 = -math.log(math.exp(s) / (1 + math.exp(s)))
    assert float(info_nce(c, d, 1.0)) == pytest.approx((row0 + row1) / 2)
    # conv-shaped features are flattened per sample
    assert float(info_nce(a.view(2, 2, 1, 1), b.view(2, 2, 1, 1), 1.0)) == pytest.approx(float(info_nce(a, b, 1.0)))


def test_high_pass_hand_computed():
    const = torch.full((2, 3, 8, 8), 0.3)
    assert high_pass(const, 2).abs().max() < 1e-6  # only the zero frequency: removed
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((-1.0) ** (i + j)).expand(1, 3, 8, 8)  # the Nyquist corner, 4√2 from the centre
    assert torch.allclose(high_pass(checker, 2), checker, atol=1e-5)
    assert torch.allclose(high_pass(checker + 0.3, 2), checker, atol=1e-5)  # the offset goes
    assert torch.allclose(high_pass(checker, 6), torch.zeros_like(checker), atol=1e-5)  # 4√2 < 6
    assert torch.allclose(high_pass(checker, 0), checker, atol=1e-6)  # r = 0: an empty disk
    # a vertical cosine of frequency 1 (distance 1 from the centre): kept by r = 1, removed by r = 1.5
    wave = torch.cos(2 * math.pi * i.float() / 8).view(1, 1, 8, 8)
    assert torch.allclose(high_pass(wave, 1), wave, atol=1e-5)
    assert high_pass(wave, 1.5).abs().max() < 1e-5
    # odd sizes work too, and the output is real with the input's shape
    odd = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(0))
    out = high_pass(odd, 2)
    assert out.shape == odd.shape and out.dtype == odd.dtype
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6)  # no zero frequency left


def test_full_loss_hand_computed():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    nce = math.log(1 + math.exp(-1 / 0.5))
    flat = torch.full((2, 1, 8, 8), 0.02)  # all low frequency: the penalty is its energy 4e-4
    assert float(frequency_penalty(flat, 2)) == pytest.approx(4e-4, rel=1e-4)
    assert float(advencoder_loss(f, f, flat, alpha=5, tau=0.5, r=2)) == pytest.approx(-5 * nce + 4e-4, abs=1e-6)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = (0.02 * (-1.0) ** (i + j)).expand(2, 1, 8, 8)  # all high frequency: no penalty
    assert abs(float(frequency_penalty(checker, 2))) < 1e-8
    assert float(advencoder_loss(f, f.flip(0), checker, alpha=2, tau=1.0, r=2)) == pytest.approx(
        -2 * math.log(1 + math.e), abs=1e-6
    )
    # by Parseval the penalty is the low-frequency energy: never negative
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert float(frequency_penalty(noise, 3)) >= 0


def test_radius_and_mask_geometry():
    assert effective_radius(8, 64, 64, 64) == 8
    assert effective_radius(8, 64, 28, 28) == pytest.approx(3.5)
    assert effective_radius(8, 64, 224, 200) == pytest.approx(25.0)
    assert effective_radius(8, 0, 28, 28) == 8
    for h, w in [(28, 28), (64, 64), (32, 48)]:
        m = patch_mask(h, w, 0.03)
        assert m.shape == (1, 1, h, w) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert 0.02 <= float(m.mean()) <= 0.04
        rows, cols = m[0, 0].nonzero(as_tuple=True)
        side = int(math.isqrt(int(m.sum())))
        assert side * side == int(m.sum())  # a square
        assert int(rows.max()) == h - 1 and int(cols.max()) == w - 1  # flush bottom-right
        assert int(rows.min()) == h - side and int(cols.min()) == w - side
        assert torch.equal(patch_mask(h, w, 0.03, "bottom-right"), m)
        for loc in LOCATIONS:  # every named place: the same square, flush with the named edges
            ml = patch_mask(h, w, 0.03, loc)
            r, c = ml[0, 0].nonzero(as_tuple=True)
            assert int(ml.sum()) == side * side and int(r.max() - r.min()) == int(c.max() - c.min()) == side - 1
            top, left = int(r.min()), int(c.min())
            assert top == {"top": 0, "bottom": h - side}.get(loc.split("-")[0], (h - side) // 2)
            col_word = loc.split("-")[-1] if loc not in ("top", "bottom") else "center"
            assert left == {"left": 0, "right": w - side}.get(col_word, (w - side) // 2)
    assert patch_origin(28, 28, 5, "center") == (11, 11) and patch_origin(28, 28, 5, "top") == (0, 11)
    with pytest.raises(ConfigError, match="did you mean 'bottom-right'"):
        patch_mask(28, 28, 0.03, "botom-right")


# --- the attacks ------------------------------------------------------------------------


def _random_delta(name, shape, gen):
    if name == "advencoder":
        return (torch.rand(shape, generator=gen) * 2 - 1) * EPS
    return torch.rand(shape, generator=gen)  # uniform patch content; the mask is the attack's


@pytest.mark.parametrize("name", NAMES)
def test_attack_budget_objective_and_seed(name, tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(32)
    for p in tiny_encoder.parameters():
        p.requires_grad_(True)
    tiny_encoder.train()
    place = {"location": "bottom-right"} if name == "advencoder-patch" else {}  # auto: test_layer_select.py
    att = create_attack(name, tiny_encoder, eps=EPS, **FAST, **place)
    p = att.fit(sur, surrogate="tiny")
    # the encoder got no gradient and is back in train mode; the generator was trained
    assert all(q.grad is None for q in tiny_encoder.parameters())
    assert tiny_encoder.training
    assert len(att.history) == FAST["iterations"] and att.images_seen == FAST["iterations"] * FAST["batch_size"]
    assert att.seconds > 0
    assert p.attack == name and p.config["preset"] == "cpu" and p.surrogate == "tiny" and p.seed == 0
    assert p.encoder_hash and p.delta.shape == (1, 3, 28, 28)

    x = tiny_data.test.float_images()[:16]
    xa = p.apply(x)
    assert xa.min() >= 0 and xa.max() <= 1
    if name == "advencoder":
        assert p.kind == "additive" and p.mask is None
        assert p.linf() <= EPS + 1e-6 and (xa - x).abs().max() <= EPS + 1e-6
    else:
        assert p.kind == "patch" and p.mask.shape == (1, 1, 28, 28)
        outside = p.mask.expand_as(x) == 0
        assert torch.equal(xa[outside], x[outside])  # nothing outside the mask changes
        assert (xa - x).abs().amax(dim=(1, 2, 3)).min() > 0  # every image is changed inside
        assert 0.02 <= float(p.mask.mean()) <= 0.04 and p.mask[0, 0, -1, -1] == 1 and p.mask[0, 0, 0, 0] == 0
        assert p.delta.min() >= 0 and p.delta.max() <= 1

    held = tiny_data.val.subset(16)  # held out from the fit; 100 random baselines stay cheap
    fitted = att.score(p.delta, held)
    g = torch.Generator().manual_seed(0)
    randoms = [att.score(_random_delta(name, p.delta.shape, g), held) for _ in range(100)]
    assert fitted > max(randoms)

    again = create_attack(name, tiny_encoder, eps=EPS, **FAST, **place).fit(sur)
    assert torch.equal(p.delta, again.delta)
    other = create_attack(name, tiny_encoder, eps=EPS, seed=1, iterations=1, batch_size=16).fit(sur)
    first = create_attack(name, tiny_encoder, eps=EPS, iterations=1, batch_size=16).fit(sur)
    assert not torch.equal(other.delta, first.delta)


@pytest.mark.parametrize("name", NAMES)
def test_presets_and_round_trip(name, tiny_encoder, tiny_data, tmp_path):
    presets = _ATTACKS[name].presets
    assert set(presets) == {"paper", "cpu"} and presets["paper"]["eps"] == presets["cpu"]["eps"] == EPS
    assert set(presets["paper"]) == set(presets["cpu"])
    paper = create_attack(name, tiny_encoder, preset="paper")
    assert paper.eps == EPS and paper.lr == 2e-4 and paper.betas == (0.5, 0.999)
    assert (paper.alpha, paper.tau, paper.radius, paper.epochs, paper.batch_size) == (5, 0.1, 8, 20, 256)
    if name == "advencoder-patch":  # the reference's place; the cpu preset lets the attacker choose
        assert presets["paper"]["location"] == "bottom-right" and presets["cpu"]["location"] == "auto"

    p = create_attack(name, tiny_encoder, iterations=1, batch_size=16).fit(tiny_data.surrogate(16))
    path = tmp_path / f"{name}.safetensors"
    p.save(path)
    q = Perturbation.load(path)
    assert q.kind == p.kind and q.attack == name and q.eps == p.eps and q.config == p.config
    assert torch.equal(q.delta, p.delta)
    assert (q.mask is None and p.mask is None) or torch.equal(q.mask, p.mask)
    x = tiny_data.test.float_images()[:4]
    assert torch.equal(q.apply(x), p.apply(x))


def test_layer_option_and_bad_options(tiny_encoder, tiny_data):
    att = create_attack("advencoder", tiny_encoder, eps=EPS, layer="layer2", iterations=1, batch_size=8)
    p = att.fit(tiny_data.surrogate(8))
    assert p.config["layer"] == "layer2" and p.linf() <= EPS + 1e-6
    p = create_attack("advencoder", tiny_encoder, eps=EPS, output="clip", widths=[8], iterations=1, batch_size=8).fit(
        tiny_data.surrogate(8)
    )
    assert p.linf() <= EPS + 1e-6
    with pytest.raises(SpecError, match="layer1.0.conv1"):
        create_attack("advencoder", tiny_encoder, eps=EPS, layer="layer9")
    with pytest.raises(ConfigError, match="output"):
        create_attack("advencoder", tiny_encoder, output="relu")
    with pytest.raises(ConfigError, match="widths"):
        create_attack("advencoder", tiny_encoder, widths="a,b")
    with pytest.raises(ConfigError, match="patch_fraction"):
        create_attack("advencoder-patch", tiny_encoder, patch_fraction=1.5)
    with pytest.raises(ConfigError, match="output"):  # the patch has no tanh/clip choice
        create_attack("advencoder-patch", tiny_encoder, output="tanh")
    with pytest.raises(ConfigError, match="unknown patch location 'centre'.*did you mean 'center'"):
        create_attack("advencoder-patch", tiny_encoder, location="centre")
    with pytest.raises(ConfigError, match="resolved by fit"):
        create_attack("advencoder-patch", tiny_encoder, location="auto").score(
            torch.zeros(1, 3, 28, 28), tiny_data.surrogate(4)
        )
