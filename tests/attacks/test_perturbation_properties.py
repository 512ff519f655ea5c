"""Property tests of ``Perturbation.apply``: range and budget for arbitrary inputs and image sizes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genaf.attacks.perturbation import Perturbation
from genaf.errors import CheckpointError


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    c = draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    ih, iw = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    eps = draw(st.floats(1e-4, 1.0))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))  # δ inside, at and beyond the budget
    delta = (torch.rand(1, c, h, w, generator=g) * 2 - 1) * eps * scale
    if scale > 1:  # make sure δ does leave the ball
        delta.view(-1)[0] = eps * scale
    n = draw(st.integers(1, 3))
    x = torch.rand(n, 3, ih, iw, generator=g)
    if draw(st.booleans()):  # saturated pixels
        x = (x > 0.5).float()
    return delta, eps, x, scale


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_additive_stays_in_range_and_budget(case, tmp_path_factory):
    delta, eps, x, scale = case
    p = Perturbation(delta=delta, eps=eps, resize="bilinear")
    if scale > 1:  # δ beyond its budget is refused on save; apply clamps it whatever it holds
        with pytest.raises(CheckpointError, match="exceeds its recorded budget"):
            p.save(tmp_path_factory.mktemp("p") / "p.pt")
    out = p.apply(x)
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - x).abs().max()) <= eps + 1e-6


@settings(max_examples=80, deadline=None)
@given(cases(), st.integers(0, 2**31 - 1))
def test_patch_changes_only_its_mask(case, seed):
    delta, _, x, _ = case
    g = torch.Generator().manual_seed(seed)
    h, w = delta.shape[-2:]
    mask = (torch.rand(1, 1, h, w, generator=g) > 0.7).float()
    if float(mask.mean()) > 0.5:  # a patch covers at most half the image (larger ones are refused)
        mask.zero_()
    p = Perturbation(delta=delta.abs().clamp(0, 1), kind="patch", eps=1.0, mask=mask, resize="bilinear")
    out = p.apply(x)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    m = torch.nn.functional.interpolate(mask, size=x.shape[-2:], mode="nearest").expand_as(x)
    assert torch.equal(out[m == 0], x[m == 0])


@settings(max_examples=40, deadline=None)
@given(cases())
def test_zero_delta_is_identity(case):
    _, eps, x, _ = case
    p = Perturbation(delta=torch.zeros(1, 3, *x.shape[-2:]), eps=eps)
    assert torch.equal(p.apply(x), x)
