"""Square attack (L∞): its pieces, its invariants on a tiny model, parity with torchattacks, bad input."""

import math

import pytest
import torch
from torch import nn

from genaf.attacks import square as sq
from genaf.attacks.square import margin_loss, p_schedule, square, square_side
from genaf.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- (a) hand-checkable pieces ---------------------------------------------------------------


def test_margin_loss_hand_computed():
    z = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.0, 5.0, 5.0], [-1.0, -4.0, -2.0]])
    y = torch.tensor([0, 2, 1, 2])
    # 3 − 2; 2 − 3; a tie 5 − 5; −2 − (−1)
    assert margin_loss(z, y).tolist() == pytest.approx([1.0, -1.0, 0.0, -1.0])
    # two classes: the margin is just the difference
    assert margin_loss(torch.tensor([[0.5, 2.0]]), torch.tensor([1])).tolist() == pytest.approx([1.5])


def test_p_schedule():
    # a 10 000-query run: halved after iterations 10, 50, 200, …, 8000
    p = [
        p_schedule(i, 10000) for i in (0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2001, 4001, 6001, 8000, 8001)
    ]
    expected = [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.8 / 64, 0.8 / 128, 0.8 / 256, 0.8 / 256]
    assert p == pytest.approx(expected + [0.8 / 512])
    # AutoAttack's 5000: iteration i is rescaled to 2i, so the first halving comes after i = 5
    assert [p_schedule(i, 5000) for i in (5, 6, 25, 26, 4000, 4001)] == pytest.approx(
        [0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512]
    )
    # a 100-query run: i = 1 is already at 100 (two halvings), i = 2 at 200 (still two), i = 3 at
    # 300 (three); p_init scales the whole schedule
    assert [p_schedule(i, 100, p_init=0.4) for i in (0, 1, 2, 3, 99)] == pytest.approx([0.4, 0.1, 0.1, 0.05, 0.4 / 512])


def test_square_side():
    assert square_side(0.8, 28, 28) == 25  # round(√627.2) = round(25.04)
    assert square_side(0.8 / 512, 28, 28) == 1  # round(√1.225)
    assert square_side(0.05, 32, 32) == 7  # round(√51.2) = round(7.16)
    assert square_side(1.0, 4, 8) == 4  # round(√32) = 6, capped at the height
    assert square_side(1e-9, 5, 5) == 1  # at least one pixel


def test_window_corners_cover_every_position_and_mask():
    gen = torch.Generator().manual_seed(0)
    top, left = sq._window_corners(2000, 3, 5, 6, gen, "all")
    assert set(top.tolist()) == {0, 1, 2} and set(left.tolist()) == {0, 1, 2, 3}  # incl. h − s and w − s
    top, left = sq._window_corners(2000, 3, 5, 6, gen)  # AutoAttack's draw: never at h − s or w − s
    assert set(top.tolist()) == {0, 1} and set(left.tolist()) == {0, 1, 2}
    for corners in sq.CORNERS:  # a full-size window has one place
        assert sq._window_corners(10, 4, 4, 4, gen, corners)[0].tolist() == [0] * 10
    mask = sq._window_mask(torch.tensor([0, 2]), torch.tensor([1, 0]), 2, 4, 3)
    assert mask.shape == (2, 1, 4, 3)
    assert mask[0, 0].int().tolist() == [[0, 1, 1], [0, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert mask[1, 0].int().tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]]


def test_vertical_stripe_start():
    """With no iterations a run returns its start: every column of every channel at x ± ε."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 7, 3))
    x = torch.full((4, 2, 6, 7), 0.5)
    x[3] = 0.0  # a black image: the −ε stripes clip to 0
    eps = 0.1
    out, m = sq._square_run(model, x, torch.zeros(4, dtype=torch.long), eps, 0, 0.8, torch.Generator().manual_seed(0))
    d = out[:3] - x[:3]
    assert torch.allclose(d.abs(), torch.full_like(d, eps))
    assert torch.equal(d, d[:, :, :1].expand_as(d))  # constant down each column
    assert bool((d[:, :, 0] > 0).any()) and bool((d[:, :, 0] < 0).any())  # both signs occur
    assert all(v == 0.0 or v == pytest.approx(eps) for v in out[3].unique().tolist())
    with torch.no_grad():
        assert torch.allclose(m, margin_loss(model(out), torch.zeros(4, dtype=torch.long)))


# --- (b) invariants on a tiny model -------------------------------------------------------------


def test_budget_range_determinism_modes_and_no_gradients(tiny_classifier):
    model, x, y = tiny_classifier()
    bn = model.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    eps = 0.05
    rng = torch.get_rng_state()
    xa = square(model, x, y, eps, n_queries=60, restarts=2, seed=0)
    assert torch.equal(rng, torch.get_rng_state()), "the global RNG must not be used"
    assert xa.shape == x.shape and xa.dtype == x.dtype and not xa.requires_grad
    assert (xa - x).abs().max() <= eps + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(xa, square(model, x, y, eps, n_queries=60, restarts=2, seed=0)), "same seed, same output"
    assert not torch.equal(xa, square(model, x, y, eps, n_queries=60, restarts=2, seed=1)), "the seed must matter"
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules()), "the model's modes must be restored"
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    # the points misclassified on clean input come back untouched; every other one was attacked
    assert torch.equal(xa[:6], x[:6])
    # the attacked points sit on a vertex of the ε-box ∩ [0,1]: each pixel at x + ε or x − ε, clipped
    up, down = (x + eps).clamp(0, 1), (x - eps).clamp(0, 1)
    assert bool(((xa[6:] == up[6:]) | (xa[6:] == down[6:])).all())
    model.eval()
    with torch.no_grad():
        fooled = model(xa[6:]).argmax(1) != y[6:]
    model.train()
    assert 0 < int(fooled.sum()) < 18, "eps=0.05 should fool some but not all points of this net in 60 queries"


def test_margin_never_increases_and_only_unfooled_points_are_queried(tiny_classifier):
    model, x, y = tiny_classifier()
    model.eval()
    x, y = x[6:], y[6:]
    rows_seen = []
    counting = nn.Sequential(model)
    counting.register_forward_pre_hook(lambda _m, inp: rows_seen.append(len(inp[0])))
    history: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out, m = sq._square_run(counting, x, y, 0.1, 80, 0.8, gen, history=history)
        assert torch.allclose(
            m, margin_loss(model(out), y), atol=1e-6
        )  # the returned margins belong to the returned points
    assert len(history) == len(rows_seen)  # the start plus one per iteration run
    assert rows_seen[0] == len(x)
    for k in range(1, len(history)):
        before, after = history[k - 1], history[k]
        assert bool((after <= before).all()), f"a margin rose at iteration {k}"
        assert rows_seen[k] == int((before >= 0).sum()), "only the points not yet fooled are queried"
        assert torch.equal(after[before < 0], before[before < 0]), "a fooled point must not move"
    assert bool((history[-1] < history[0]).any()), "the search should lower some margins"


# --- (c) parity with torchattacks on Fashion-MNIST ----------------------------------------------


def _robust_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def test_parity_with_torchattacks(fashion_mlp):
    """Our Square against torchattacks' on 500 Fashion-MNIST points at eps = 0.05, 1000 queries.

    Seed-to-seed spread of robust accuracy (%), seeds 0–9, measured once with 1000 queries:
      torchattacks:                        mean 48.56, sd 0.55 (47.6 … 49.4)
      ours (corners="autoattack", default): mean 48.26, sd 0.57 (47.4 … 49.2)
      ours (corners="all"):                 mean 45.54, sd 0.44 (45.0 … 46.2)
    One seed each differs by up to ~1.6 points (sd of a difference ≈ 0.8), so a 1-point bound on a
    single seed would hold by luck only. Means over 3 seeds have a difference with sd ≈ 0.46; we
    allow 1.5 points (≈ 3 sd) between torchattacks and ours with AutoAttack's corner draw. Drawing
    corners over every position (the paper's Algorithm 2) is measurably stronger, 3.0 points on
    average over 10 seeds: it must sit between 5 points below torchattacks and 1 above.
    At seeds 0–2: torchattacks 47.6 / 48.2 / 48.8, ours 47.6 / 48.2 / 48.2, ours with "all"
    46.2 / 45.4 / 45.2.
    """
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = fashion_mlp
    eps, n_queries, seeds = 0.05, 1000, (0, 1, 2)
    clean = _robust_accuracy(model, x, y)
    assert clean > 75

    def theirs(seed):
        with torch.random.fork_rng():  # torchattacks reseeds the global RNG
            attack = torchattacks.Square(
                model,
                norm="Linf",
                eps=eps,
                n_queries=n_queries,
                n_restarts=1,
                p_init=0.8,
                loss="margin",
                resc_schedule=True,
                seed=seed,
            )
            return _robust_accuracy(model, attack(x, y), y)

    def ours(seed, corners="autoattack"):
        xa = square(model, x, y, eps, n_queries=n_queries, seed=seed, corners=corners)
        assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
        return _robust_accuracy(model, xa, y)

    ra = {"theirs": [theirs(s) for s in seeds], "ours": [ours(s) for s in seeds]}
    ra["ours-all-corners"] = [ours(s, "all") for s in seeds]
    assert all(p.grad is None for p in model.parameters())
    mean = {k: sum(v) / len(v) for k, v in ra.items()}
    print(ra, mean)  # visible with pytest -s

    for k in ra:  # far from clean accuracy and from 0
        assert 20 <= mean[k] <= clean - 20, (k, ra)
    assert abs(mean["ours"] - mean["theirs"]) <= 1.5, ra
    assert mean["theirs"] - 5 <= mean["ours-all-corners"] <= mean["theirs"] + 1, ra


# --- (d) bad input --------------------------------------------------------------------------------


def test_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    for eps in (0.0, -0.1, 1.5, math.nan, "big"):
        with pytest.raises(ConfigError, match="eps"):
            square(model, x, y, eps)
    for n in (0, -3):
        with pytest.raises(ConfigError, match="n_queries must be >= 1"):
            square(model, x, y, 0.1, n_queries=n)
    for p in (0.0, -0.2, 1.5, math.nan):
        with pytest.raises(ConfigError, match="p_init=.* is outside"):
            square(model, x, y, 0.1, p_init=p)
    with pytest.raises(ConfigError, match="n_queries must be a number"):
        square(model, x, y, 0.1, n_queries="many")
    with pytest.raises(ConfigError, match="p_init must be a number"):
        square(model, x, y, 0.1, p_init=None)
    with pytest.raises(ConfigError, match="restarts must be >= 1"):
        square(model, x, y, 0.1, restarts=0)
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        square(model, x.flatten(1), y, 0.1)
    with pytest.raises(ConfigError, match="labels must have shape"):
        square(model, x, y[:1], 0.1)
    with pytest.raises(ConfigError, match="corners must be one of autoattack, all"):
        square(model, x, y, 0.1, corners="paper")
    with pytest.raises(ConfigError) as err:
        square(model, x, y, 0.1, p_init=2)
    assert "\n" not in str(err.value)
