"""Every evaluation self-check passes on an honest model and fires on a deliberately broken one."""

import pytest
import torch
from torch import nn

from genaf.attacks.perturbation import Perturbation
from genaf.checks import (
    check_eps_monotonic,
    check_logits,
    check_perturbed_batch,
    check_pgd_loss_rises,
    check_prediction_collapse,
    check_whitebox_vs_transfer,
    independent_perturbed,
    run_checks,
    whitebox_curve,
)

WB = {"eps": 0.05, "step": 0.0125, "steps": 10, "restarts": 1}
D = 16  # images are (1, 4, 4): 16 pixels


def _data(n=200, seed=0):
    """Two classes split by the mean brightness of a 4x4 image (margin > 0.02 from 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.6 + 0.2
    m = x.mean((1, 2, 3))
    keep = (m - 0.5).abs() > 0.02
    x = x[keep]
    return x, (x.mean((1, 2, 3)) > 0.5).long()


class Linear(nn.Module):
    """An honest differentiable classifier: logits ±w·(mean(x) − 0.5)."""

    def __init__(self, quantize: int = 0, cut: bool = True):
        super().__init__()
        self.cut = cut
        self.w = nn.Parameter(torch.tensor(40.0))
        self.quantize = quantize
        self.config = {"num_classes": 2}

    def forward(self, x):
        if self.quantize:  # non-differentiable input quantisation: zero input gradients
            x = torch.round(x * self.quantize) / self.quantize
            x = x.detach() if self.cut else x  # round() alone already has a zero gradient
        z = self.w * (x.mean((1, 2, 3)) - 0.5)
        return torch.stack([-z, z], 1)


class Softmaxed(Linear):
    def forward(self, x):
        return super().forward(x).softmax(1)


class Noisy(Linear):
    def forward(self, x):  # dropout left on in eval: not deterministic
        return nn.functional.dropout(super().forward(x), 0.5, training=True)


class Gated(Linear):
    """Answers class 1 whenever a pixel is far from any clean value: on class-1 images,
    robust accuracy rises with ε (only large perturbations reach the gate)."""

    def forward(self, x):
        z = super().forward(x)
        far = (x - 0.5).abs().amax((1, 2, 3)) > 0.45  # clean pixels lie in [0.2, 0.8]
        return torch.where(far[:, None], torch.tensor([0.0, 50.0]), z)


def test_honest_model_passes_every_check():
    x, y = _data()
    model = Linear().eval()
    dae = Perturbation(delta=torch.full((1, 1, 4, 4), -0.05), eps=0.05, attack="hand")
    rep = run_checks(model, x, y, {"dae": dae}, WB, n_classes=2)
    assert rep["failed"] == [], rep
    for name in ("logits", "pgd_loss_rises", "eps_monotonic", "whitebox_vs_transfer"):
        assert rep[name]["passed"] is True


def test_logits_check_fires_on_probabilities_and_nondeterminism_and_nan():
    x, _ = _data()
    assert not check_logits(Softmaxed().eval(), x, 2)["passed"]
    assert "probabilities" in check_logits(Softmaxed().eval(), x, 2)["detail"]
    assert "not deterministic" in check_logits(Noisy().eval(), x, 2)["detail"]
    bad = Linear()
    with torch.no_grad():
        bad.w.fill_(float("nan"))
    assert "NaN" in check_logits(bad, x, 2)["detail"]
    assert "columns" in check_logits(Linear(), x, 10)["detail"]


def test_perturbation_applied_check_catches_a_misapplied_perturbation():
    """The check compares the batch that was evaluated with an independent clamp(x + δ)."""
    x, _ = _data()
    dae = Perturbation(delta=torch.full((1, 1, 4, 4), 0.05), eps=0.05, attack="hand")
    good = dae.apply(x)
    assert check_perturbed_batch(x, good, 0.05, independent_perturbed(dae, x))["passed"]
    # never applied: the clean batch itself was evaluated
    rep = check_perturbed_batch(x, x.clone(), 0.05, independent_perturbed(dae, x))
    assert not rep["passed"] and "not applied" in rep["detail"]
    # applied without the clamp to [0,1]
    rep = check_perturbed_batch(x, x + 0.9, 0.05, independent_perturbed(dae, x))
    assert not rep["passed"] and "[0,1]" in rep["detail"] and "more than" in rep["detail"]
    # applied twice (within [0,1] but 2ε away and not what an independent computation gives)
    twice = dae.apply(dae.apply(x))
    rep = check_perturbed_batch(x, twice, 0.05, independent_perturbed(dae, x))
    assert not rep["passed"] and "independent" in rep["detail"]
    # a patch: pasted where the mask is, nothing bounds its distance, the rest is untouched
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    patch = Perturbation(delta=torch.ones(1, 1, 4, 4), kind="patch", mask=mask, eps=1.0, attack="hand")
    assert check_perturbed_batch(x, patch.apply(x), None, independent_perturbed(patch, x))["passed"]
    rep = check_perturbed_batch(x, (x + 0.05).clamp(0, 1), None, independent_perturbed(patch, x))
    assert not rep["passed"]


class OneClass(Linear):
    """Answers class 0 for every image (still finite, deterministic logits)."""

    def forward(self, x):
        z = super().forward(x)
        return torch.stack([z.abs().sum(1) + 1.0, torch.zeros(len(x))], 1)


def test_prediction_collapse_fires_on_a_model_that_answers_one_class():
    x, y = _data()
    rep = run_checks(OneClass().eval(), x, y, {}, None, n_classes=2)
    assert rep["failed"] == []  # the per-batch checks cannot see it: it needs the predictions
    collapsed = check_prediction_collapse(OneClass().eval()(x).argmax(1), y)
    assert collapsed["passed"] is False and collapsed["top_class_share"] == 1.0
    assert check_prediction_collapse(Linear().eval()(x).argmax(1), y)["passed"]
    # ten balanced classes: 50 % of the answers on one class is already a collapse
    labels = torch.arange(1000) % 10
    assert not check_prediction_collapse(torch.cat([torch.zeros(510), labels[510:]]).long(), labels)["passed"]
    assert check_prediction_collapse(labels.roll(1), labels)["passed"]


def test_evaluate_model_records_the_new_checks_and_flags_a_one_class_model():
    from genaf.data import ImageSet
    from genaf.evaluation import evaluate_model

    x, y = _data()
    test = ImageSet((x.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8), y, torch.arange(len(y)), "test", "toy")
    dae = Perturbation(delta=torch.full((1, 1, 4, 4), -0.05), eps=0.05, attack="hand")
    honest = evaluate_model(Linear().eval(), test, {"dae": dae})["metrics"]
    assert honest["checks"]["failed"] == [] and honest["checks"]["perturbation_applied"]["dae"]["passed"]
    broken = evaluate_model(OneClass().eval(), test, {"dae": dae})["metrics"]
    assert "prediction_collapse" in broken["checks"]["failed"]
    assert broken["attacks"]["dae"]["split"] == "test" and broken["attacks"]["dae"]["dataset"] == "toy"


@pytest.mark.parametrize("cut", [True, False])
def test_pgd_loss_check_fires_on_masked_gradients(cut):
    x, y = _data()
    rep = check_pgd_loss_rises(Linear(quantize=4, cut=cut).eval(), x, y, WB)
    assert rep["passed"] is False and "did not rise" in rep["detail"]
    assert check_pgd_loss_rises(Linear().eval(), x, y, WB)["passed"]


def test_eps_monotonic_check_fires_when_accuracy_rises_with_eps():
    x, y = _data()
    x, y = x[y == 1], y[y == 1]
    curve = whitebox_curve(Gated().eval(), x, y, WB, [0.0125, 0.025, 0.05, 0.3])
    rep = check_eps_monotonic(curve)
    assert rep["passed"] is False and "rose by" in rep["detail"], curve
    honest = whitebox_curve(Linear().eval(), x, y, WB, [0.0125, 0.025, 0.05, 0.1])
    assert check_eps_monotonic(honest)["passed"]
    # the tolerance is one point, no more
    assert check_eps_monotonic({0.1: 0.50, 0.2: 0.505})["passed"]
    assert not check_eps_monotonic({0.1: 0.50, 0.2: 0.52})["passed"]


def test_whitebox_vs_transfer_check_fires_on_gradient_masking():
    x, y = _data()
    model = Linear(quantize=4).eval()  # white-box PGD sees zero gradients
    dae = Perturbation(delta=torch.full((1, 1, 4, 4), -0.1), eps=0.1, attack="hand")
    rep = run_checks(model, x, y, {"dae": dae}, {**WB, "eps": 0.1, "step": 0.025}, n_classes=2)
    assert "whitebox_vs_transfer" in rep["failed"] and "pgd_loss_rises" in rep["failed"]
    pair = rep["whitebox_vs_transfer"]["pairs"]["dae"]
    assert pair["whitebox_ra"] > pair["transfer_ra"] + pair["margin"]
    ok = check_whitebox_vs_transfer({0.1: 0.40}, {"dae": (0.1, 0.45)}, 200)
    assert ok["passed"]


def test_whitebox_results_are_reused_only_for_the_same_weights_images_and_settings():
    """A second evaluation of the same model on the same images takes the white-box PGD runs of
    the first (the demo and the bench evaluate each run twice); any change recomputes them."""
    x, y = _data()
    model = Linear().eval()
    dae = Perturbation(delta=torch.full((1, 1, 4, 4), -0.05), eps=0.05, attack="hand")
    first = run_checks(model, x, y, {"dae": dae}, WB, n_classes=2)
    assert "whitebox_reused" not in first and first["whitebox_key"]
    lines = []
    again = run_checks(model, x, y, {"dae": dae}, WB, n_classes=2, reuse=first, log=lines.append)
    assert again["whitebox_reused"] is True and any("reused" in s for s in lines)
    for name in ("pgd_loss_rises", "eps_monotonic", "whitebox_vs_transfer", "whitebox_curve"):
        assert again[name] == first[name]
    # a forged curve under the right key is what gets reused: the key, not the numbers, decides
    forged = {**first, "whitebox_curve": {k: 0.0 for k in first["whitebox_curve"]}}
    assert run_checks(model, x, y, {"dae": dae}, WB, n_classes=2, reuse=forged)["whitebox_curve"] == forged[
        "whitebox_curve"
    ]
    # other weights, images, seed or PGD settings: recomputed, not reused
    other = Linear().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    changed = [
        run_checks(other, x, y, {"dae": dae}, WB, n_classes=2, reuse=forged),
        run_checks(model, x.flip(0), y.flip(0), {"dae": dae}, WB, n_classes=2, reuse=forged),
        run_checks(model, x, y, {"dae": dae}, WB, n_classes=2, seed=1, reuse=forged),
        run_checks(model, x, y, {"dae": dae}, {**WB, "steps": WB["steps"] + 1}, n_classes=2, reuse=forged),
    ]
    for rep in changed:
        assert "whitebox_reused" not in rep and rep["whitebox_key"] != first["whitebox_key"]
        assert rep["whitebox_curve"] != forged["whitebox_curve"]
    # an earlier report that lacks an ε now needed (a new perturbation's) is recomputed
    wider = Perturbation(delta=torch.full((1, 1, 4, 4), -0.07), eps=0.07, attack="hand")
    assert "whitebox_reused" not in run_checks(model, x, y, {"dae": wider}, WB, n_classes=2, reuse=first)


def test_the_loss_check_and_the_curve_share_their_run_at_the_base_eps(monkeypatch):
    """The loss check's PGD run is the curve's run at the base ε (same settings, same seed), so
    the self-checks attack once per ε: 4 runs for ε ∈ {¼, ½, 1, 2} × base, not 5. The curve is
    the one a separate :func:`whitebox_curve` measures, to the last digit."""
    import genaf.checks as checks

    x, y = _data()
    model = Linear().eval()
    calls = []
    real = checks._wb_pgd
    monkeypatch.setattr(checks, "_wb_pgd", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    rep = run_checks(model, x, y, {}, WB, n_classes=2)
    assert sorted(calls) == sorted(f * WB["eps"] for f in (0.25, 0.5, 1.0, 2.0))
    monkeypatch.undo()
    alone = whitebox_curve(model, x, y, WB, [f * WB["eps"] for f in (0.25, 0.5, 1.0, 2.0)])
    assert rep["whitebox_curve"] == {f"{e:.6f}": a for e, a in alone.items()}
    assert rep["pgd_loss_rises"] == check_pgd_loss_rises(model, x, y, WB)


def test_an_attack_model_is_attacked_and_the_model_scores(monkeypatch):
    """``attack_model`` (genaf.evaluation passes a BatchNorm-folded copy) is what PGD runs on;
    the accuracies are the model's; the reuse key tells the two apart."""
    x, y = _data()
    model = Linear().eval()
    twin = Linear().eval()  # the same function: the same curve
    seen = []

    class Spy(Linear):
        def forward(self, x):
            seen.append(len(x))
            return super().forward(x)

    rep = run_checks(model, x, y, {}, WB, n_classes=2, attack_model=twin)
    assert rep["whitebox_curve"] == run_checks(model, x, y, {}, WB, n_classes=2)["whitebox_curve"]
    spy = Spy().eval()
    run_checks(model, x, y, {}, WB, n_classes=2, attack_model=spy)
    assert len(seen) >= 4 * WB["steps"]  # every PGD step ran on the attack model
    broken = Linear().eval()  # an attack model that is not the model: the model's accuracy is reported
    with torch.no_grad():
        broken.w.fill_(-40.0)  # its gradients point the other way: PGD on it helps the model
    off = run_checks(model, x, y, {}, WB, n_classes=2, attack_model=broken)
    assert off["whitebox_curve"] != rep["whitebox_curve"]
    again = run_checks(model, x, y, {}, WB, n_classes=2, attack_model=twin)
    assert off["whitebox_key"] != rep["whitebox_key"] == again["whitebox_key"]
