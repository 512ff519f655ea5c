"""genaf.attacks.PGD / FGSM / Universal: torchattacks-style objects over the existing attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genaf.attacks as A
from genaf.attacks.whitebox import fgsm, pgd
from genaf.errors import ConfigError, DataError

EPS = 8 / 255

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    """A small classifier on [0,1] images with BatchNorm and Dropout, so its mode matters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8 * 8 * 8, 10),
    )


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _in_budget(adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert float((adv - x).abs().max()) > eps / 2  # it moved


def test_pgd_object_equals_the_function_for_the_same_seed():
    model, (x, y) = _model(), _batch()
    atk = A.PGD(model, eps=EPS, alpha=2 / 255, steps=3, random_start=True, seed=5)
    adv = atk(x, y)
    ref = pgd(model, x, y, EPS, 2 / 255, 3, random_start=True, gen=torch.Generator().manual_seed(5))
    assert torch.equal(adv, ref)
    _in_budget(adv, x, EPS)
    # its stream advances: a second call starts elsewhere, a new object with the seed repeats the first
    assert not torch.equal(atk(x, y), adv)
    assert torch.equal(A.PGD(model, eps=EPS, alpha=2 / 255, steps=3, seed=5)(x, y), adv)
    assert "steps=3" in repr(atk)


def test_fgsm_object_equals_the_function():
    model, (x, y) = _model(), _batch()
    adv = A.FGSM(model, eps=EPS)(x, y)
    assert torch.equal(adv, fgsm(model, x, y, EPS))
    _in_budget(adv, x, EPS)


def test_model_modes_restored_and_no_parameter_gradient():
    model, (x, y) = _model(), _batch()
    model.train()
    frozen = model[0].bias
    frozen.requires_grad_(False)  # a parameter the caller froze stays frozen
    for atk in (A.PGD(model, eps=EPS, steps=2, seed=0), A.FGSM(model, eps=EPS)):
        running = model[1].running_mean.clone()
        atk(x, y)
        assert all(m.training for m in model.modules())
        assert torch.equal(model[1].running_mean, running)  # BatchNorm ran in eval mode
        assert all(p.grad is None for p in model.parameters())
        assert [p.requires_grad for p in model.parameters()] == [p is not frozen for p in model.parameters()]


def test_universal_object_applies_a_loaded_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    delta = (torch.rand(1, 3, 8, 8, generator=g) * 2 - 1) * EPS
    pert = A.Perturbation(delta=delta, eps=EPS, attack="uniform-noise")
    path = tmp_path / "p.safetensors"
    pert.save(path)
    atk = A.Universal(path)
    x, y = _batch()
    adv = atk(x, y)
    assert torch.equal(adv, A.Perturbation.load(path).apply(x))
    assert torch.equal(atk(x), adv)  # labels are not needed
    _in_budget(adv, x, EPS)
    assert atk.eps == pytest.approx(EPS)
    big = torch.rand(2, 3, 16, 16, generator=g)
    with pytest.raises(DataError, match="8x8 but the images are 16x16"):
        atk(big)
    assert A.Universal(path, resize="bilinear")(big).shape == big.shape


def test_bad_inputs_are_one_line_errors():
    model, (x, y) = _model(), _batch()
    atk = A.PGD(model, eps=EPS, steps=1)
    with pytest.raises(DataError, match=r"not \[0, 1\]: pass unnormalised pixels"):
        atk(x * 4 - 2, y)
    with pytest.raises(DataError, match="one class index per image"):
        atk(x, y[:2])
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        A.PGD(model, eps=8)
    with pytest.raises(ConfigError, match="steps >= 1"):
        A.PGD(model, steps=0)
