import math

import pytest
import torch

from genaf.errors import ConfigError
from genaf.methods.genetic import genetic_regularizer, shifted_cosine_distance

E = 1e-7


def reference_loop(a, b, y, s, e=E):
    """A plain-Python transcription of METHOD.md §3 (loops, no vectorisation)."""
    n = len(a)

    def norm(v):
        r = math.sqrt(sum(t * t for t in v))
        return [t / r for t in v] if r > 0 else [0.0 for _ in v]

    def dist(z):
        zn = [norm(v) for v in z]
        d = [[1 - sum(p * q for p, q in zip(zn[i], zn[j])) for j in range(n)] for i in range(n)]
        out = []
        for i in range(n):
            m = min(d[i][j] for j in range(n) if j != i)
            row = [0.0 if j == i else d[i][j] - m for j in range(n)]
            out.append([min(max(v, e), 2 - e) for v in row])
        return out

    W = [[math.tanh((s[i] + s[j]) / 32) for j in range(n)] for i in range(n)]
    M = [[1.0 if y[i] != y[j] else -1.0 for j in range(n)] for i in range(n)]
    da, db = dist(a), dist(b)
    sa = [[1 - da[i][j] for j in range(n)] for i in range(n)]
    sb = [
        [1 - min(max((1 - W[i][j]) * db[i][j] + 2 * M[i][j] * W[i][j], e), 2 - e) for j in range(n)] for i in range(n)
    ]

    def rownorm(m):
        out = []
        for row in m:
            r = [(v + 1) / 2 for v in row]
            t = sum(r)
            out.append([v / t for v in r])
        return out

    P, Q = rownorm(sa), rownorm(sb)
    return sum(
        Q[i][j] * math.log((Q[i][j] + e) / (P[i][j] + e))
        + (1 - Q[i][j]) * math.log((1 - Q[i][j] + e) / (1 - P[i][j] + e))
        for i in range(n)
        for j in range(n)
    )


def test_hand_computed_two_samples():
    # n = 2: after the nearest-neighbour shift every distance is e, so P is uniform (0.5).
    # With s = (16, 16): W = tanh(1); different labels push the off-diagonal target distance to
    # (1 - W) e + 2W, so S^B_01 = 1 - 2W (approx), (S+1)/2 = 1 - W, the diagonal stays 1.
    w = math.tanh(1.0)
    off = (1 - ((1 - w) * E + 2 * w) + 1) / 2
    diag = (1 - E + 1) / 2
    q = [diag / (diag + off), off / (diag + off)]
    per_entry = [qq * math.log((qq + E) / (0.5 + E)) + (1 - qq) * math.log((1 - qq + E) / (0.5 + E)) for qq in q]
    expected = 2 * sum(per_entry)
    assert expected == pytest.approx(0.81324, abs=1e-4)  # worked out by hand, see the comment
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    out = genetic_regularizer(a, b, torch.tensor([0, 1]), torch.tensor([16.0, 16.0]))
    assert float(out) == pytest.approx(expected, rel=1e-5)
    mean = genetic_regularizer(a, b, torch.tensor([0, 1]), torch.tensor([16.0, 16.0]), reduction="mean")
    assert float(mean) == pytest.approx(expected / 4, rel=1e-5)


def test_zero_weights_identical_graphs_give_zero():
    z = torch.randn(5, 3)
    out = genetic_regularizer(z, z.clone(), torch.tensor([0, 1, 0, 2, 1]), torch.zeros(5))
    assert float(out) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 6, 4
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    a[2] = 0  # a zero row stays zero
    y = torch.randint(0, 3, (n,), generator=g)
    s = torch.rand(n, generator=g) * 5
    ref = reference_loop(a.tolist(), b.tolist(), y.tolist(), s.tolist())
    assert float(genetic_regularizer(a, b, y, s)) == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_finite_nonnegative_and_gradients_flow():
    a = torch.randn(8, 5, requires_grad=True)
    b = torch.randn(8, 5, requires_grad=True)
    s = torch.rand(8, requires_grad=True)
    out = genetic_regularizer(a, b, torch.randint(0, 3, (8,)), s)
    assert torch.isfinite(out) and out >= 0
    out.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert b.grad is not None and s.grad is not None  # the reference does not detach s


def test_shifted_distance_properties():
    z = torch.randn(7, 3)
    d = shifted_cosine_distance(z)
    assert torch.all(d >= E) and torch.all(d <= 2 - E)
    # after the nearest-neighbour shift each row's off-diagonal minimum is (clamped) zero
    off = d + torch.eye(7) * 10
    assert torch.allclose(off.min(1).values, torch.full((7,), E))


def test_bad_inputs():
    with pytest.raises(ConfigError):
        genetic_regularizer(torch.randn(1, 3), torch.randn(1, 3), torch.tensor([0]), torch.zeros(1))
    with pytest.raises(ConfigError):
        genetic_regularizer(
            torch.randn(3, 3), torch.randn(3, 3), torch.tensor([0, 1, 2]), torch.zeros(3), reduction="max"
        )


def test_tiny_rows_keep_their_direction_in_float64():
    # regression: rows with a norm below float32's range must not be flushed to zero rows
    # (found by the rescaling property test: a 1.4e-45 row and its half gave 0.135 vs 0.0)
    a = torch.tensor([[1.4013e-45], [0.0], [1.0]], dtype=torch.float64)
    b = torch.zeros(3, 1, dtype=torch.float64)
    y, s = torch.tensor([0, 0, 0]), torch.zeros(3, dtype=torch.float64)
    k = torch.tensor([[0.5], [1.0], [1.0]], dtype=torch.float64)
    base, scaled = genetic_regularizer(a, b, y, s), genetic_regularizer(a * k, b, y, s)
    assert base.dtype == torch.float64 and torch.allclose(base, scaled)
