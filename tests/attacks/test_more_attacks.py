import math

import pytest
import torch

import genaf.attacks.fff  # noqa: F401  (registration)
import genaf.attacks.per_sample  # noqa: F401  (registration)
from genaf.attacks import create_attack
from genaf.attacks.fff import fff_input, fff_objective
from genaf.attacks.per_sample import embedding_objective, negative_cosine
from genaf.errors import ConfigError


def test_objectives_hand_computed():
    a1 = torch.tensor([[[[1.0, -3.0]]]])  # mean |a| = 2
    a2 = torch.tensor([[-0.5, 0.5, 0.5, -0.5]])  # mean |a| = 0.5
    assert float(fff_objective([a1, a2])) == pytest.approx(math.log(2) + math.log(0.5))
    assert float(fff_objective([a1])) == pytest.approx(math.log(2))
    adv = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    clean = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # cos: row 0 = 1/sqrt(2), row 1 = 1
    assert float(negative_cosine(adv, clean)) == pytest.approx(-(1 / math.sqrt(2) + 1) / 2)
    assert float(embedding_objective(adv, clean, "cos")) == pytest.approx(-(1 / math.sqrt(2) + 1) / 2)
    assert float(embedding_objective(adv, clean, "l2")) == pytest.approx((1 + 1) / 2)
    with pytest.raises(ConfigError):
        embedding_objective(adv, clean, "l1")
    assert torch.equal(fff_input(torch.tensor([-0.1, 0.7])), torch.tensor([0.4, 1.0]))


def _random_objectives(att, x, n=100):
    """The attack's batch objective for ``n`` uniform perturbations of the same budget, in one forward pass."""
    g = torch.Generator().manual_seed(0)
    xr = (x.unsqueeze(0) + (torch.rand((n, *x.shape), generator=g) * 2 - 1) * att.eps).clamp(0, 1)
    with torch.no_grad():
        clean = att.features(x)
        feats = att.features(xr.flatten(0, 1)).unflatten(0, (n, len(x)))
    return [float(att.loss(f, clean)) for f in feats]


@pytest.mark.parametrize(
    "name,cfg",
    [("embedding-pgd", {"steps": 3}), ("embedding-pgd", {"steps": 3, "loss": "cos"}), ("ssp", {"steps": 3})],
)
def test_per_sample_attack(name, cfg, tiny_encoder, tiny_data):
    x = tiny_data.test.float_images()[:8]
    tiny_encoder.train()
    att = create_attack(name, tiny_encoder, **cfg)
    xa = att(x)
    assert tiny_encoder.training and all(m.training for m in tiny_encoder.modules())
    assert all(p.grad is None for p in tiny_encoder.parameters())
    assert (xa - x).abs().max() <= att.eps + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    assert "eps=" in repr(att)
    tiny_encoder.eval()
    with torch.no_grad():
        fitted = float(att.objective(xa, x))
    assert fitted > max(_random_objectives(att, x))


@pytest.mark.parametrize("name", ["embedding-pgd", "ssp"])
def test_per_sample_same_seed_same_result(name, tiny_encoder, tiny_data):
    x = tiny_data.test.float_images()[:8]
    xa = create_attack(name, tiny_encoder, steps=1, seed=3)(x)
    xb = create_attack(name, tiny_encoder, steps=1, seed=3)(x)
    assert torch.equal(xa, xb)
    xc = create_attack(name, tiny_encoder, steps=0, seed=4)(x)
    assert not torch.equal(xa, xc) and (xc - x).abs().max() <= 16 / 255 + 1e-6


def test_per_sample_bad_options(tiny_encoder):
    with pytest.raises(ConfigError):
        create_attack("embedding-pgd", tiny_encoder, loss="l1")
    with pytest.raises(ConfigError):
        create_attack("ssp", tiny_encoder, eps=2.0)
    with pytest.raises(ConfigError):
        create_attack("ssp", tiny_encoder, alpha=1.0)
    assert create_attack("ssp", tiny_encoder, preset="paper").steps == 100


def test_fff_budget_objective_and_seed(tiny_encoder, tiny_data):
    tiny_encoder.train()
    att = create_attack("fff", tiny_encoder, iterations=15, halve_every=5)
    p = att.fit(tiny_data.surrogate(4))
    assert tiny_encoder.training
    assert all(q.grad is None for q in tiny_encoder.parameters())
    assert p.attack == "fff" and p.delta.shape == (1, 3, 28, 28)
    assert p.linf() <= att.eps + 1e-6
    fitted = att.score(p.delta)
    g = torch.Generator().manual_seed(0)
    randoms = [att.score((torch.rand(p.delta.shape, generator=g) * 2 - 1) * att.eps) for _ in range(100)]
    assert fitted > max(randoms)
    p2 = create_attack("fff", tiny_encoder, iterations=15, halve_every=5).fit(tiny_data.surrogate(4))
    assert torch.equal(p.delta, p2.delta)
    # without data the resolution is the encoder's input size (or the size option)
    small = create_attack("fff", tiny_encoder, iterations=1, size=16).fit()
    assert small.delta.shape == (1, 3, 16, 16)
