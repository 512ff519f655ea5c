"""A perturbation file cannot lie about its budget: ε finite in (0, 1], ‖δ‖∞ ≤ ε up to rounding,
a patch that is no patch refused; ``apply`` clamps to the ε ball whatever δ holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from _reliability import recorder, section
from genaf.attacks.perturbation import MAX_PATCH_FRACTION, Perturbation
from genaf.errors import CheckpointError

EPS = 16 / 255
_record = recorder("perturbation-budget.json", section(2))


def write(path, delta, mask=None, **meta):
    """A perturbation file as anyone could write it (no check on the way out)."""
    meta = {"kind": "additive", "attack": "hand", **meta}
    tensors = {"delta": delta.contiguous()}
    if mask is not None:
        tensors["mask"] = mask.contiguous()
    save_file(tensors, str(path), metadata={"genaf_perturbation": json.dumps(meta)})
    return path


def corner_mask(n: int, side: int) -> torch.Tensor:
    m = torch.zeros(1, 1, n, n)
    m[..., :side, :side] = 1
    return m


BIG = torch.full((1, 1, 8, 8), 0.9)

# (what, δ, mask, metadata, text the one-line error must contain)
LIES = [
    ("δ 0.9 recorded as ε = 0", BIG, None, {"eps": 0.0}, "outside (0, 1]"),
    ("δ 0.9 recorded as ε = −1", BIG, None, {"eps": -1.0}, "outside (0, 1]"),
    ("δ 0.9 recorded as ε = NaN", BIG, None, {"eps": float("nan")}, "outside (0, 1]"),
    ("δ 0.9 recorded as ε = inf", BIG, None, {"eps": float("inf")}, "outside (0, 1]"),
    ("δ 0.9 recorded as ε = 50", BIG, None, {"eps": 50.0}, "outside (0, 1]"),
    ("δ 0.9 recorded as ε = 16/255", BIG, None, {"eps": EPS}, "exceeds its recorded budget"),
    ("δ 0.9 with no ε recorded", BIG, None, {}, "records no budget"),
    ("ε recorded as a string", BIG, None, {"eps": "0.9"}, "must be a number"),
    ("δ 16/255 + 1e-4 in float32 recorded as ε = 16/255", torch.full((1, 1, 8, 8), EPS + 1e-4), None, {"eps": EPS},
     "exceeds"),
    ("δ stored as integers", torch.ones(1, 1, 8, 8, dtype=torch.int64), None, {"eps": 1.0}, "must hold floats"),
    ("patch covering the whole image", torch.rand(1, 1, 8, 8), torch.ones(1, 1, 8, 8), {"kind": "patch", "eps": 1.0},
     "covers 100.0 %"),
    ("patch covering 56 % of the image", torch.rand(1, 1, 8, 8), corner_mask(8, 6), {"kind": "patch", "eps": 1.0},
     "covers 56.2 %"),
    ("patch recorded with ε = 16/255", torch.rand(1, 1, 8, 8), corner_mask(8, 2), {"kind": "patch", "eps": EPS},
     "record eps=1"),
    ("patch values outside [0, 1]", torch.full((1, 1, 8, 8), 3.0), corner_mask(8, 2), {"kind": "patch", "eps": 1.0},
     "outside the pixel range"),
    ("patch mask of another shape", torch.rand(1, 1, 8, 8), corner_mask(4, 2), {"kind": "patch", "eps": 1.0},
     "mask must be (1, 1, H, W)"),
]


@pytest.mark.parametrize("what,delta,mask,meta,needle", LIES, ids=[c[0] for c in LIES])
def test_lying_files_are_refused_in_one_line(tmp_path, what, delta, mask, meta, needle, reliability):
    path = write(tmp_path / "p.pt", delta, mask, **meta)
    reliability["input"] = f"Perturbation.load: {what}"
    with pytest.raises(CheckpointError) as info:
        Perturbation.load(path)
    msg = str(info.value)
    reliability["message"] = msg.replace(str(tmp_path), "$TMP")
    assert needle in msg and str(path) in msg and "\n" not in msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_delta_at_its_budget_loads_in_any_float_dtype(tmp_path, dtype, reliability):
    """δ clamped to ε in float32/float64 and then stored in half precision rounds past ε: allowed."""
    reliability.update(input=f"δ at ε = 16/255 stored as {dtype}", outcome="accepted")
    d = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).clamp(-EPS, EPS)
    d.view(-1)[:2] = torch.tensor([EPS, -EPS])
    p = Perturbation.load(write(tmp_path / "p.pt", d.to(dtype), eps=EPS))
    assert p.delta.dtype == torch.float32 and p.eps == EPS
    assert p.linf() >= EPS * (1 - 1e-2)


def test_apply_clamps_whatever_delta_holds(reliability):
    """Before: eps <= 0 meant 'no clamp', so a δ of 0.9 recorded as ε = 0 was applied in full."""
    reliability.update(input="δ of 0.9 set after construction, then applied", outcome="clamped to ε")
    x = torch.full((2, 3, 8, 8), 0.5)
    p = Perturbation(delta=torch.zeros(1, 1, 8, 8), eps=EPS)
    p.delta = torch.full((1, 1, 8, 8), 0.9)  # changed after construction: still clamped
    assert float((p.apply(x) - x).abs().max()) <= EPS + 1e-7
    for bad in (0.0, -1.0, float("nan"), 50.0):
        with pytest.raises(CheckpointError, match=r"outside \(0, 1\]"):
            Perturbation(delta=torch.zeros(1, 1, 8, 8), eps=bad)


def test_save_refuses_a_delta_outside_its_budget(tmp_path, reliability):
    reliability["input"] = "Perturbation.save of a δ of 0.5 with ε = 16/255"
    p = Perturbation(delta=torch.full((1, 1, 8, 8), 0.5), eps=EPS)
    with pytest.raises(CheckpointError, match="exceeds its recorded budget") as info:
        p.save(tmp_path / "p.pt")
    reliability["message"] = str(info.value)
    assert not (tmp_path / "p.pt").exists()


def test_patches_up_to_the_threshold_load(tmp_path, reliability):
    reliability.update(input="a patch covering 47 % of the image (under the 50 % threshold)", outcome="accepted")
    n = 16
    side = int((MAX_PATCH_FRACTION * n * n) ** 0.5)  # 11: 47 % of the image
    p = Perturbation.load(write(tmp_path / "p.pt", torch.rand(1, 3, n, n), corner_mask(n, side), kind="patch", eps=1))
    assert p.mask_fraction() == side * side / (n * n) <= MAX_PATCH_FRACTION
    x = torch.rand(1, 3, n, n)
    out = p.apply(x)
    assert torch.equal(out[..., side:, :], x[..., side:, :])


def test_patch_fraction_above_the_threshold_is_an_option_error(tiny_encoder, reliability):
    reliability["input"] = "advencoder-patch with patch_fraction=0.9"
    from genaf.attacks import create_attack
    from genaf.errors import ConfigError

    with pytest.raises(ConfigError, match="full-image perturbation") as info:
        create_attack("advencoder-patch", tiny_encoder, patch_fraction=0.9)
    reliability["message"] = str(info.value)


def test_a_header_that_claims_a_huge_delta_is_refused_before_reading(tmp_path, reliability):
    """A 200-byte perturbation file whose header declares a 100000×100000 δ: refused from the
    header (declared bytes against the file's size), before safetensors allocates anything."""
    reliability["input"] = "Perturbation.load of a 200-byte file whose header declares a 100000x100000 float δ"
    header = {
        "__metadata__": {"genaf_perturbation": json.dumps({"eps": EPS, "kind": "additive"})},
        "delta": {"dtype": "F32", "shape": [1, 1, 100000, 100000], "data_offsets": [0, 4 * 10**10]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    with pytest.raises(CheckpointError, match="malformed or out-of-file") as info:
        Perturbation.load(path)
    reliability["message"] = str(info.value).replace(str(tmp_path), "$TMP")
