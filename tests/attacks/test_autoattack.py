"""APGD-CE, APGD-T and the AutoAttack ensemble: losses, schedule, budget, determinism, parity."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genaf.attacks.autoattack import apgd, autoattack, checkpoints, dlr_loss, dlr_targeted_loss
from genaf.attacks.whitebox import pgd
from genaf.errors import ConfigError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_dlr_losses_hand_computed():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [1.0, 4.0, 0.0, 2.0]])
    y = torch.tensor([0, 2, 1])
    # sorted logits: 3 ≥ 2 ≥ 1 ≥ 0, then 4 ≥ 2 ≥ 1 ≥ 0
    # row 0: -(3 - 2) / (3 - 1); row 1: -(2 - 3) / (3 - 1); row 2: -(4 - 2) / (4 - 1)
    assert dlr_loss(z, y).tolist() == pytest.approx([-0.5, 0.5, -2 / 3])
    t = torch.tensor([1, 3, 0])
    # denominators z_π1 − (z_π3 + z_π4)/2: 3 − 0.5 = 2.5 and 4 − 0.5 = 3.5
    # row 0: -(3 - 1) / 2.5; row 1: -(2 - 0) / 2.5; row 2: -(4 - 1) / 3.5
    assert dlr_targeted_loss(z, y, t).tolist() == pytest.approx([-0.8, -0.8, -3 / 3.5])
    # shift and positive-scale invariance
    assert dlr_loss(3 * z + 7, y).tolist() == pytest.approx(dlr_loss(z, y).tolist())
    assert dlr_targeted_loss(0.5 * z - 1, y, t).tolist() == pytest.approx(dlr_targeted_loss(z, y, t).tolist())
    with pytest.raises(ConfigError, match="C >= 4"):
        dlr_targeted_loss(z[:, :3], y.clamp(max=2), t.clamp(max=2))


def test_checkpoint_schedule():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99, (1.05)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(50) == [11, 21, 29, 35, 40, 44, 47]
    assert checkpoints(1) == []
    for n in (5, 10, 37, 250):
        w = checkpoints(n)
        assert w == sorted(set(w)) and all(0 < v < n for v in w)


def test_budget_range_determinism_and_no_parameter_gradients(one_thread, tiny_classifier):
    model, x, y = tiny_classifier()
    bn = model.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    eps = 4 / 255
    runs = {
        "ce": lambda s: apgd(model, x, y, eps, steps=12, loss="ce", restarts=2, seed=s),
        "dlr": lambda s: apgd(model, x, y, eps, steps=12, loss="dlr", seed=s),
        "dlr-targeted": lambda s: apgd(model, x, y, eps, steps=12, loss="dlr-targeted", target_classes=3, seed=s),
        "autoattack": lambda s: autoattack(model, x, y, eps, steps=12, target_classes=3, seed=s, n_queries=30),
        "autoattack-apgd": lambda s: autoattack(model, x, y, eps, steps=12, target_classes=3, seed=s, version="apgd"),
    }
    for name, run in runs.items():
        xa = run(0)
        assert xa.shape == x.shape and not xa.requires_grad, name
        assert (xa - x).abs().max() <= eps + 1e-6, name
        assert xa.min() >= 0 and xa.max() <= 1, name
        assert torch.equal(xa, run(0)), f"{name}: the same seed must give the same output"
        assert not torch.equal(xa, run(1)), f"{name}: the seed should drive the random start"
        assert all(p.grad is None for p in model.parameters()), name
        assert model.training and bn.training, "the model's modes must be restored"
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
        assert int(bn.num_batches_tracked) == stats[2]
    # AutoAttack leaves the points misclassified on clean input untouched
    xa = runs["autoattack"](0)
    assert torch.equal(xa[:6], x[:6])
    # The standard version runs its four attacks in order, each on the points all earlier ones left
    # robust; every point it reports fooled is misclassified, and the others keep the clean image.
    log: dict = {}
    xa = autoattack(model, x, y, 0.5 / 255, steps=12, target_classes=3, seed=0, n_queries=30, log=log)
    assert list(log) == ["apgd-ce", "apgd-t", "fab-t", "square"][: len(log)] and len(log) >= 2, log
    assert log["apgd-ce"]["attacked"] == 18  # the 18 points classified correctly on clean input
    for a, b in zip(list(log), list(log)[1:]):
        assert log[b]["attacked"] == log[a]["attacked"] - log[a]["fooled"], log
    model.eval()
    with torch.no_grad():
        wrong = model(xa).argmax(1) != y
    model.train()
    changed = (xa != x).flatten(1).any(1)
    assert int(wrong[6:].sum()) == sum(v["fooled"] for v in log.values())
    assert torch.equal(changed[6:], wrong[6:])
    apgd_only: dict = {}
    autoattack(model, x, y, 0.5 / 255, steps=12, target_classes=3, seed=0, version="apgd", log=apgd_only)
    assert list(apgd_only) == ["apgd-ce", "apgd-t"][: len(apgd_only)]
    # APGD-CE raises the loss over the clean input on every point it attacks
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
        after = F.cross_entropy(model(runs["ce"](0)), y, reduction="none")
    model.train()
    assert bool((after > before).all())


def test_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    for eps in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            apgd(model, x, y, eps)
        with pytest.raises(ConfigError):
            autoattack(model, x, y, eps)
    with pytest.raises(ConfigError, match="ce, dlr, dlr-targeted") as err:
        apgd(model, x, y, 0.1, loss="dlr-targetted")
    assert "did you mean 'dlr-targeted'" in str(err.value)
    with pytest.raises(ConfigError):
        apgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ConfigError):
        apgd(model, x, y, 0.1, restarts=0)
    with pytest.raises(ConfigError, match="did you mean 'standard'"):
        autoattack(model, x, y, 0.1, version="standart")
    with pytest.raises(ConfigError, match="n_queries"):
        autoattack(model, x, y, 0.1, n_queries=0)


def _robust_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def test_parity_with_torchattacks(fashion_mlp, one_thread):
    """The key acceptance check: our APGD-CE / APGD-T match torchattacks' robust accuracy."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = fashion_mlp
    eps, steps = 0.05, 100
    assert len(x) >= 500
    clean = _robust_accuracy(model, x, y)
    assert clean > 75

    ra = {}
    ra["pgd10"] = _robust_accuracy(
        model, pgd(model, x, y, eps, step=eps / 4, steps=10, gen=torch.Generator().manual_seed(0)), y
    )
    x_ce = apgd(model, x, y, eps, steps=steps, loss="ce", seed=0)
    ra["ours-ce"] = _robust_accuracy(model, x_ce, y)
    with torch.random.fork_rng():  # torchattacks reseeds the global RNG
        x_theirs = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", n_restarts=1, seed=0)(x, y)
    ra["theirs-ce"] = _robust_accuracy(model, x_theirs, y)
    x_t = apgd(model, x, y, eps, steps=steps, loss="dlr-targeted", target_classes=9, seed=0)
    ra["ours-t"] = _robust_accuracy(model, x_t, y)
    with torch.random.fork_rng():
        x_theirs = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, n_classes=10)(
            x, y
        )
    ra["theirs-t"] = _robust_accuracy(model, x_theirs, y)
    # the ensemble on a 200-point subset (to keep the test cheap)
    n = 200
    x_aa = autoattack(model, x[:n], y[:n], eps, steps=steps, seed=0)
    assert (x_aa - x[:n]).abs().max() <= eps + 1e-6 and x_aa.min() >= 0 and x_aa.max() <= 1
    ra["autoattack@200"] = _robust_accuracy(model, x_aa, y[:n])
    ra["ours-ce@200"] = _robust_accuracy(model, x_ce[:n], y[:n])
    ra["ours-t@200"] = _robust_accuracy(model, x_t[:n], y[:n])
    assert all(p.grad is None for p in model.parameters())
    print(ra)  # visible with pytest -s

    assert 20 <= ra["theirs-ce"] <= 70 and 20 <= ra["theirs-t"] <= 70, ra  # far from 0 and from clean
    assert abs(ra["ours-ce"] - ra["theirs-ce"]) <= 1.0, ra
    assert abs(ra["ours-t"] - ra["theirs-t"]) <= 1.0, ra
    assert ra["ours-ce"] <= ra["pgd10"] + 1.0, ra
    # the ensemble is (up to the random starts) the per-point worst case of both
    assert ra["autoattack@200"] <= min(ra["ours-ce@200"], ra["ours-t@200"]) + 1.0, ra
