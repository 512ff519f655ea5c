import pytest
import torch

from genaf.attacks import Perturbation, attack_names, create_attack, pgd
from genaf.attacks.l4a import l4a_objective
from genaf.attacks.ssp import feature_distortion
from genaf.errors import CheckpointError, ConfigError, DataError, SpecError
from genaf.models import DownstreamModel

EPS = 16 / 255


def test_objectives_hand_computed():
    a = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]]])
    assert float(l4a_objective(a)) == pytest.approx((1 + 4 + 0 + 9) / 4)
    adv = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    clean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert float(feature_distortion(adv, clean)) == pytest.approx(((1 + 4) + (1 + 1)) / 2)


@pytest.mark.parametrize("name", ["l4a-base", "ssp-universal"])
def test_universal_attack_budget_objective_and_seed(name, tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(64)
    att = create_attack(name, tiny_encoder, eps=EPS, iterations=12, batch_size=32)
    p = att.fit(sur)
    assert p.linf() <= EPS + 1e-6
    x = tiny_data.test.float_images()[:16]
    xa = p.apply(x)
    assert xa.min() >= 0 and xa.max() <= 1 and (xa - x).abs().max() <= EPS + 1e-6
    fitted = att.score(p.delta, sur)
    g = torch.Generator().manual_seed(0)
    randoms = [att.score((torch.rand(p.delta.shape, generator=g) * 2 - 1) * EPS, sur) for _ in range(100)]
    assert fitted > max(randoms)
    p2 = create_attack(name, tiny_encoder, eps=EPS, iterations=12, batch_size=32).fit(sur)
    assert torch.equal(p.delta, p2.delta)


def test_registry_and_bad_options(tiny_encoder):
    assert {"l4a-base", "ssp-universal", "uniform-noise"} <= set(attack_names())
    with pytest.raises(SpecError, match="did you mean 'l4a-base'"):
        create_attack("l4a-bse", tiny_encoder)
    with pytest.raises(ConfigError):
        create_attack("l4a-base", tiny_encoder, eps=0.0)
    with pytest.raises(ConfigError):
        create_attack("l4a-base", tiny_encoder, eps=1.5)
    with pytest.raises(SpecError, match="layer1.0.conv1"):
        create_attack("l4a-base", tiny_encoder, eps=EPS, layer="layer9")


def test_perturbation_round_trip_and_resize(tmp_path, tiny_encoder, tiny_data):
    p = create_attack("uniform-noise", tiny_encoder, eps=EPS).fit(tiny_data.surrogate(8))
    path = tmp_path / "p.pt"
    p.save(path)
    q = Perturbation.load(path)
    assert torch.equal(p.delta, q.delta) and q.attack == "uniform-noise" and q.eps == p.eps
    assert q.encoder_hash == p.encoder_hash
    big = torch.rand(2, 3, 40, 40)
    with pytest.raises(DataError, match="28x28 but the images are 40x40"):
        q.apply(big)
    q.resize = "bilinear"
    out = q.apply(big)
    assert out.shape == big.shape and (out - big).abs().max() <= EPS + 1e-6
    (tmp_path / "bad.pt").write_bytes(b"not a perturbation")
    with pytest.raises(CheckpointError):
        Perturbation.load(tmp_path / "bad.pt")


def test_pgd_budget_and_strength(tiny_encoder, tiny_data):
    model = DownstreamModel(tiny_encoder, 10).eval()
    x = tiny_data.test.float_images()[:32]
    pred = model(x).argmax(1)
    xa = pgd(model, x, pred, 8 / 255, 2 / 255, 5, gen=torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    import torch.nn.functional as F

    with torch.no_grad():
        noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 8 / 255).clamp(0, 1)
        losses = [float(F.cross_entropy(model(z), pred)) for z in (x, noise, xa)]
    assert losses[2] > losses[1] and losses[2] > losses[0]  # PGD raises the loss more than noise does
    assert all(p.grad is None for p in model.parameters())
