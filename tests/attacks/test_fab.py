"""FAB-T: the L∞ hyperplane-in-box projection, the attack's contract, and parity with torchattacks."""

import copy

import pytest
import torch
from torch import nn

from genaf.attacks.fab import fab_t, project_linf_box
from genaf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the projection ---------------------------------------------------------------------------


def _project(p, w, b):
    p, w = torch.tensor(p, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
    return project_linf_box(p[None], w[None], torch.tensor([b], dtype=torch.float64))[0]


def test_projection_hand_computed():
    # p = (.5,.5), w = (1,1), b = 1.5: δ1 + δ2 = .5, the box does not bind -> (.25,.25)
    assert _project([0.5, 0.5], [1.0, 1.0], 1.5).tolist() == pytest.approx([0.25, 0.25])
    # p = (.9,.2), w = (1,1), b = 1.6: (.25,.25) would leave the box; coordinate 1 stops at 1,
    # so δ = (.1, λ) with .1 + λ = .5 -> (.1,.4)
    assert _project([0.9, 0.2], [1.0, 1.0], 1.6).tolist() == pytest.approx([0.1, 0.4])
    # p = (.5,.5), w = (2,-1), b = 0: w·p = .5 must drop by .5 -> δ = (-λ, λ) with 3λ = .5
    assert _project([0.5, 0.5], [2.0, -1.0], 0.0).tolist() == pytest.approx([-1 / 6, 1 / 6])
    # the same from the other side of the hyperplane: b = 1 needs w·δ = +.5 -> (λ, -λ)
    assert _project([0.5, 0.5], [2.0, -1.0], 1.0).tolist() == pytest.approx([1 / 6, -1 / 6])
    # a coordinate with zero weight never moves: p = (.3,.7,.5), w = (1,0,0), b = .5 -> (.2,0,0)
    assert _project([0.3, 0.7, 0.5], [1.0, 0.0, 0.0], 0.5).tolist() == pytest.approx([0.2, 0.0, 0.0])
    # a point on the hyperplane stays put
    assert _project([0.2, 0.6], [1.0, 2.0], 1.4).tolist() == pytest.approx([0.0, 0.0])
    # a hyperplane that misses the box (z1 + z2 = 3): the step goes to the closest corner (1,1)
    assert _project([0.5, 0.25], [1.0, 1.0], 3.0).tolist() == pytest.approx([0.5, 0.75])
    # a pixel at the box edge, pointing out, cannot help: p = (1,.5), w = (1,1), b = 1.8 -> (0,.3)
    assert _project([1.0, 0.5], [1.0, 1.0], 1.8).tolist() == pytest.approx([0.0, 0.3])


def _min_norm_by_bisection(p, w, b):
    """The smallest λ for which {δ : |δ_i| ≤ λ, p + δ ∈ [0,1]^d} meets the hyperplane w·(p + δ) = b.

    That set is a box, on which w·δ takes every value between its smallest and largest (reached at
    corners, coordinate by coordinate): an independent feasibility test, bisected in λ.
    """
    r = b - float(p @ w)

    def feasible(lam):
        lo, hi = torch.clamp(-p, min=-lam), torch.clamp(1 - p, max=lam)
        return float(torch.minimum(w * lo, w * hi).sum()) <= r <= float(torch.maximum(w * lo, w * hi).sum())

    if not feasible(1.0):
        return None
    a, z = 0.0, 1.0
    for _ in range(60):
        mid = (a + z) / 2
        a, z = (a, mid) if feasible(mid) else (mid, z)
    return z


def test_projection_is_the_minimal_linf_step_on_random_instances():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for d in (2, 3, 5, 50):
        for _ in range(40):
            p = torch.rand(d, generator=gen, dtype=torch.float64)
            p[torch.rand(d, generator=gen) < 0.2] = 0.0  # some pixels on the box's faces
            w = torch.randn(d, generator=gen, dtype=torch.float64)
            w[torch.rand(d, generator=gen) < 0.1] = 0.0
            b = float(p @ w) + float(torch.randn((), generator=gen, dtype=torch.float64)) * float(w.abs().sum()) / 4
            delta = project_linf_box(p[None], w[None], torch.tensor([b], dtype=torch.float64))[0]
            z = p + delta
            assert float(z.min()) >= 0 and float(z.max()) <= 1
            assert bool((delta[w == 0] == 0).all())
            best = _min_norm_by_bisection(p, w, b)
            if best is None:  # the hyperplane misses the box: the corner closest to it
                corner = torch.where((w > 0) == (b > float(p @ w)), 1.0, 0.0).to(p.dtype)
                corner = torch.where(w == 0, p, corner)
                assert torch.allclose(z, corner)
                continue
            assert float(z @ w) == pytest.approx(b, abs=1e-9)  # on the hyperplane
            assert float(delta.abs().max()) == pytest.approx(best, abs=1e-9)  # and no smaller step is
            checked += 1
    assert checked > 100


def test_projection_against_a_grid_search_in_2d():
    """Walk the whole line w·z = b through the unit square and keep its point nearest p in L∞."""
    gen = torch.Generator().manual_seed(1)
    s = torch.linspace(-3, 3, 600001, dtype=torch.float64)
    for _ in range(20):
        p = torch.rand(2, generator=gen, dtype=torch.float64)
        w = torch.randn(2, generator=gen, dtype=torch.float64)
        z0 = p + torch.rand((), generator=gen, dtype=torch.float64) * 0.6 * torch.tensor([1.0, -1.0])
        b = float(z0 @ w)
        line = z0[None] + s[:, None] * torch.stack((-w[1], w[0]))[None] / w.norm()
        inside = line[((line >= 0) & (line <= 1)).all(1)]
        delta = _project(p.tolist(), w.tolist(), b)
        if len(inside) == 0:
            continue
        grid_best = float((inside - p).abs().amax(1).min())
        assert float(delta.abs().max()) <= grid_best + 1e-9
        assert float(delta.abs().max()) >= grid_best - 2e-5  # the grid's resolution
        assert float((p + delta) @ w) == pytest.approx(b, abs=1e-9)


def test_projection_against_linear_programming():
    """min λ  s.t.  −λ ≤ δ_i ≤ λ,  −p_i ≤ δ_i ≤ 1 − p_i,  w·δ = b − w·p  (variables δ, λ)."""
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(2)
    for d in (2, 3):
        for _ in range(15):
            p = torch.rand(d, generator=gen, dtype=torch.float64)
            w = torch.randn(d, generator=gen, dtype=torch.float64)
            b = float(p @ w) + 0.3 * float(torch.randn((), generator=gen, dtype=torch.float64))
            eye = torch.eye(d, dtype=torch.float64)
            a_ub = torch.cat((torch.cat((eye, -torch.ones(d, 1)), 1), torch.cat((-eye, -torch.ones(d, 1)), 1)))
            res = optimize.linprog(
                c=[0.0] * d + [1.0],
                A_ub=a_ub.numpy(),
                b_ub=[0.0] * (2 * d),
                A_eq=[w.tolist() + [0.0]],
                b_eq=[b - float(p @ w)],
                bounds=[(-float(pi), 1 - float(pi)) for pi in p] + [(0, None)],
            )
            delta = _project(p.tolist(), w.tolist(), b)
            if res.status == 2:  # infeasible: the hyperplane misses the box, the closest corner is taken
                corner = torch.where((w > 0) == (b > float(p @ w)), 1.0, 0.0).to(p.dtype)
                assert torch.allclose(p + delta, corner)
                continue
            assert res.status == 0
            assert float(delta.abs().max()) == pytest.approx(res.fun, abs=1e-7)
            assert float((p + delta) @ w) == pytest.approx(b, abs=1e-9)


def test_projection_batch_in_float32():
    gen = torch.Generator().manual_seed(3)
    p = torch.rand(64, 784, generator=gen)
    p[:, :300] = 0.0  # a dark background, as in the images FAB attacks
    w = torch.randn(64, 784, generator=gen)
    b = (p * w).sum(1) + 2 * torch.randn(64, generator=gen)
    delta = project_linf_box(p, w, b)
    z = p + delta
    assert delta.dtype == torch.float32 and z.min() >= 0 and z.max() <= 1
    assert torch.allclose((z * w).sum(1), b, atol=1e-3)
    ref = project_linf_box(p.double(), w.double(), b.double())
    assert torch.allclose(delta.double(), ref, atol=1e-5)
    for i in range(0, 64, 8):
        assert float(ref[i].abs().max()) == pytest.approx(
            _min_norm_by_bisection(p[i].double(), w[i].double(), float(b[i]))
        )


# --- the attack on a tiny model ---------------------------------------------------------------


def test_contract_on_a_tiny_model(tiny_classifier):
    model, x, y = tiny_classifier(n_wrong=5)
    model.train()
    model.body[4].eval()  # a submodule in another mode than its parent must keep it
    bn = model.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    modes = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()
    eps = 0.015  # breaks about half of the correctly classified points
    runs = {
        "default": lambda s: fab_t(model, x, y, eps, steps=10, target_classes=3, seed=s),
        "restarts": lambda s: fab_t(model, x, y, eps, steps=3, target_classes=2, restarts=3, seed=s),
    }
    for name, run in runs.items():
        xa = run(0)
        assert xa.shape == x.shape and xa.dtype == x.dtype and not xa.requires_grad, name
        assert (xa - x).abs().max() <= eps + 1e-6, name
        assert xa.min() >= 0 and xa.max() <= 1, name
        assert torch.equal(xa, run(0)), f"{name}: the same seed must give the same output"
        assert all(p.grad is None for p in model.parameters()), name
        assert [m.training for m in model.modules()] == modes, f"{name}: each submodule's mode must be restored"
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1]), name
        assert int(bn.num_batches_tracked) == stats[2], name
        assert torch.equal(torch.random.get_rng_state(), rng), f"{name}: the global RNG must not move"

        changed = (xa != x).flatten(1).any(1)
        assert not changed[:5].any(), f"{name}: points misclassified on clean input stay unchanged"
        model.eval()
        with torch.no_grad():
            wrong = model(xa).argmax(1) != y
        model.train()
        model.body[4].eval()
        assert bool(wrong[changed].all()), f"{name}: every changed point must be misclassified"
        assert 0 < int(changed.sum()) < len(x) - 5, f"{name}: expected some points broken and some not"
    assert torch.equal(runs["default"](0), runs["default"](1)), "without restarts nothing is random"
    # nothing is broken within a tiny budget: every point comes back unchanged
    assert torch.equal(fab_t(model, x, y, 1e-4, steps=10, target_classes=3), x)
    model.eval()


def test_targets_follow_the_clean_logit_order():
    """Class 1 (the 2nd largest logit) moves in lockstep with class 0, so its boundary is out of
    reach; class 2 (the 3rd) can overtake class 0. One target breaks nothing, two break all."""
    d = 8
    model = nn.Linear(d, 3)
    with torch.no_grad():
        model.weight.copy_(torch.stack((torch.ones(d), torch.ones(d), torch.ones(d) * 1.5)))
        model.bias.copy_(torch.tensor([0.0, -0.1, -2.3]))
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.02 * (2 * torch.rand(10, d, generator=gen) - 1)
    y = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        assert bool((model(x).argsort(1, descending=True) == torch.tensor([0, 1, 2])).all())
    assert torch.equal(fab_t(model, x, y, 0.2, steps=10, target_classes=1), x)
    xa = fab_t(model, x, y, 0.2, steps=10, target_classes=2)
    with torch.no_grad():
        assert bool((model(xa).argmax(1) == 2).all())
    assert (xa - x).abs().max() <= 0.2


class _Plateau(nn.Module):
    """Two classes; class 1's logit is ``10·relu(mean(x) − 0.5)``, flat (zero gradient) at inputs
    whose mean is below 0.5, so FAB cannot move from them: only a random start can help."""

    def forward(self, x):
        s = x.flatten(1).mean(1) - 0.5
        return torch.stack((torch.full_like(s, 0.01), 10 * torch.relu(s)), 1)


def test_random_restarts_are_seeded():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 16, generator=gen)
    x = (x - x.mean(1, keepdim=True) + 0.49).clamp(0, 1)  # mean(x) ≈ 0.49: flat, correctly classified
    model, y, eps = _Plateau(), torch.zeros(40, dtype=torch.long), 0.2
    assert torch.equal(fab_t(model, x, y, eps, steps=5), x), "from x itself FAB is stuck"
    runs = [fab_t(model, x, y, eps, steps=5, restarts=4, seed=s) for s in (0, 0, 1)]
    broken = (runs[0] != x).any(1)
    assert 0 < int(broken.sum()) < len(x)
    with torch.no_grad():
        assert bool((model(runs[0][broken]).argmax(1) == 1).all())
    assert (runs[0] - x).abs().max() <= eps + 1e-6
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_finds_the_minimal_perturbation_of_a_linear_classifier():
    """With an affine two-class model the boundary is a hyperplane, and the smallest L∞ step to it
    is |z_1 − z_0| / ‖w_1 − w_0‖₁ when the box does not bind; FAB must end just above it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
        x = 0.4 + 0.2 * torch.rand(16, 2, 4, 4)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        w = model[1].weight
        exact = (logits[:, 0] - logits[:, 1]).abs() / (w[0] - w[1]).abs().sum()
    assert float(exact.max()) < 0.4  # so the box [0,1] never binds
    xa = fab_t(model, x, y, 1.0, steps=30)
    dist = (xa - x).flatten(1).abs().amax(1)
    with torch.no_grad():
        assert bool((model(xa).argmax(1) != y).all())
    assert bool((dist >= exact * (1 - 1e-4)).all())
    assert bool((dist <= exact * 1.01).all()), (dist / exact).max()
    # the same budget cut just below each point's distance leaves every point unbroken
    for i in range(3):
        assert torch.equal(fab_t(model, x[i : i + 1], y[i : i + 1], float(exact[i]) * 0.99, steps=30), x[i : i + 1])


# --- parity with torchattacks -----------------------------------------------------------------


def _robust(model, x, xa, y, eps) -> torch.Tensor:
    """A point is robust unless its adversarial example is misclassified AND within eps."""
    with torch.no_grad():
        wrong = model(xa).argmax(1) != y
    within = (xa - x).flatten(1).abs().amax(1) <= eps + 1e-6
    return ~(wrong & within)


def test_parity_with_torchattacks(fashion_mlp):
    """The acceptance check: our FAB-T's robust accuracy matches torchattacks' multi-targeted FAB."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = fashion_mlp
    n, eps, steps = 300, 0.05, 100
    x, y = x[:n], y[:n]
    with torch.no_grad():
        clean = 100.0 * float((model(x).argmax(1) == y).float().mean())
    assert clean > 75

    xa = fab_t(model, x, y, eps, steps=steps, target_classes=9, restarts=1, seed=0)
    assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert all(p.grad is None for p in model.parameters()) and not model.training
    ours = 100.0 * float(_robust(model, x, xa, y, eps).float().mean())
    changed = (xa != x).flatten(1).any(1)
    with torch.no_grad():
        assert bool((model(xa[changed]).argmax(1) != y[changed]).all())

    theirs_model = copy.deepcopy(model)  # torchattacks' FAB backpropagates into the parameters
    with torch.random.fork_rng():  # torchattacks reseeds the global RNG
        attack = torchattacks.FAB(
            theirs_model,
            norm="Linf",
            eps=eps,
            steps=steps,
            n_restarts=1,
            alpha_max=0.1,
            eta=1.05,
            beta=0.9,
            multi_targeted=True,
            n_classes=10,
            seed=0,
        )
        xt = attack(x, y)
    theirs = 100.0 * float(_robust(model, x, xt, y, eps).float().mean())
    print({"clean": clean, "ours": ours, "theirs": theirs})  # visible with pytest -s

    assert 15 <= theirs <= clean - 20, (clean, theirs)  # far from 0 and from clean accuracy
    assert 15 <= ours <= clean - 20, (clean, ours)
    assert abs(ours - theirs) <= 1.0, (ours, theirs)


# --- bad input --------------------------------------------------------------------------------


def test_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    bad = [{"eps": e} for e in (0.0, -0.1, 1.5, float("nan"))]
    bad += [{"steps": 0}, {"steps": "many"}, {"target_classes": 0}, {"restarts": 0}, {"eta": None}]
    bad += [{"alpha_max": -0.1}, {"alpha_max": 1.5}, {"eta": 0.0}, {"beta": 0.0}, {"beta": 1.2}]
    for kw in bad:
        args = {"eps": 0.1, **kw}
        with pytest.raises(ConfigError) as err:
            fab_t(model, x, y, **args)
        assert "\n" not in str(err.value), kw
    with pytest.raises(ConfigError, match="C >= 2"):
        fab_t(nn.Sequential(nn.Flatten(), nn.Linear(12, 1)), x, torch.tensor([0, 0]), 0.1)
    with pytest.raises(ConfigError, match=r"\[0,1\]"):
        fab_t(model, x + 1.0, y, 0.1)
    with pytest.raises(ConfigError, match="shape"):
        fab_t(model, x, y[:1], 0.1)
    with pytest.raises(ConfigError, match="labels"):
        fab_t(model, x, torch.tensor([0, 7]), 0.1)
    # an empty batch is fine
    assert fab_t(model, x[:0], y[:0], 0.1).shape == (0, 3, 2, 2)


def test_target_count_is_capped_at_the_number_of_other_classes():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        x = torch.rand(6, 3, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    capped = fab_t(model, x, y, 0.3, steps=5, target_classes=2)
    assert torch.equal(fab_t(model, x, y, 0.3, steps=5, target_classes=50), capped)
