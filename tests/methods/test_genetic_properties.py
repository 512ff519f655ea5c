"""Property tests of the genetic regulariser (any input: zero rows, duplicate rows, n = 2)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genaf.methods.genetic import genetic_regularizer

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def batches(draw):
    n = draw(st.integers(2, 7))
    d = draw(st.integers(1, 5))
    a = torch.tensor(draw(st.lists(st.lists(finite, min_size=d, max_size=d), min_size=n, max_size=n)))
    b = torch.tensor(draw(st.lists(st.lists(finite, min_size=d, max_size=d), min_size=n, max_size=n)))
    if draw(st.booleans()):  # duplicate a row
        a[n - 1] = a[0]
    if draw(st.booleans()):  # a zero row
        b[0] = 0
    y = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    s = torch.tensor(draw(st.lists(st.floats(0, 50, width=32), min_size=n, max_size=n)))
    return a, b, y, s


@settings(max_examples=150, deadline=None)
@given(batches())
def test_finite_and_non_negative(batch):
    a, b, y, s = batch
    for reduction in ("sum", "mean"):
        out = genetic_regularizer(a, b, y, s, reduction=reduction)
        assert torch.isfinite(out)
        assert float(out) >= -1e-6


@settings(max_examples=100, deadline=None)
@given(batches(), st.data())
def test_invariant_to_positive_row_rescaling(batch, data):
    a, b, y, s = batch
    n = len(a)
    ka = torch.tensor(data.draw(st.lists(st.floats(0.01, 100), min_size=n, max_size=n))).unsqueeze(1)
    kb = torch.tensor(data.draw(st.lists(st.floats(0.01, 100), min_size=n, max_size=n))).unsqueeze(1)
    base = genetic_regularizer(a.double(), b.double(), y, s.double())
    scaled = genetic_regularizer(a.double() * ka, b.double() * kb, y, s.double())
    assert torch.allclose(base, scaled, rtol=1e-4, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_equivariant_to_permuting_the_batch(batch, rnd):
    a, b, y, s = batch
    perm = list(range(len(a)))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    base = genetic_regularizer(a.double(), b.double(), y, s.double())
    permuted = genetic_regularizer(a.double()[p], b.double()[p], y[p], s.double()[p])
    assert torch.allclose(base, permuted, rtol=1e-6, atol=1e-8)
