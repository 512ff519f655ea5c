"""Images decoded by the real range of their mode; bombs refused from the header; only the images
the splits use are decoded and resized."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _reliability import recorder, section
from genaf import limits
from genaf.data import load_dataset
from genaf.data.imagefolder import _read_image
from genaf.errors import DataError

RAMP = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)  # 0 ... 1 in 64 steps
EXPECT = np.round(RAMP * 255).astype(np.uint8)
MEMORY_TESTS = ("bomb", "pixel_limit", "resized", "decodes_only", "image_size")
_record = recorder(
    "images.json", lambda name: section(1) if any(k in name for k in MEMORY_TESTS) else section(3), "decoded"
)


def _decoded(path) -> np.ndarray:
    t = _read_image(Path(path))
    assert t.dtype == torch.uint8 and t.shape[0] == 3
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    return t[0].numpy()


@pytest.mark.parametrize("ext", [".tiff", ".pfm"])
def test_float_image_in_unit_range_is_taken_as_is(tmp_path, ext, reliability):
    """Before: a float image in [0, 1] was scaled as if 0-255 and came out black."""
    reliability["input"] = f"float (mode F) {ext} image with values in [0, 1]"
    p = tmp_path / f"f{ext}"
    Image.fromarray(RAMP, mode="F").save(p)
    assert Image.open(p).mode == "F"
    got = _decoded(p)
    assert np.abs(got.astype(int) - EXPECT).max() <= 1
    assert got.max() == 255


@pytest.mark.parametrize("ext", [".tiff", ".pfm"])
def test_non_finite_pixels_are_refused_naming_the_file(tmp_path, ext, reliability):
    """Before: NaN pixels became 0 without a word."""
    reliability["input"] = f"float {ext} image with a NaN and an inf pixel"
    arr = RAMP.copy()
    arr[2, 3] = np.nan
    arr[4, 4] = np.inf
    p = tmp_path / f"nan{ext}"
    Image.fromarray(arr, mode="F").save(p)
    with pytest.raises(DataError) as info:
        _read_image(p)
    msg = str(info.value)
    reliability.update(outcome="refused cleanly", message=msg)
    assert str(p) in msg and "2 non-finite" in msg and "\n" not in msg


def test_float_image_outside_unit_range_is_refused_with_its_range(tmp_path, reliability):
    p = tmp_path / "hdr.tiff"
    Image.fromarray(RAMP * 300 - 2, mode="F").save(p)
    with pytest.raises(DataError, match=r"values in \[-2, 298\]") as info:
        _read_image(p)
    assert str(p) in str(info.value)
    reliability.update(outcome="refused cleanly", message=str(info.value))


def test_sixteen_and_thirty_two_bit_integer_images(tmp_path, reliability):
    reliability["input"] = "16-bit PNG (I;16) and 32-bit integer TIFF (I) ramps to 65535 (mode I below 0 refused)"
    a16 = (RAMP * 65535).round().astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.abs(_decoded(tmp_path / "g16.png").astype(int) - EXPECT).max() <= 1
    # mode I (32-bit): read as 16-bit, so 65535 is white and 255 is almost black (the stated rule)
    Image.fromarray(a16.astype(np.int32)).save(tmp_path / "i32.tiff")
    assert Image.open(tmp_path / "i32.tiff").mode == "I"
    assert np.abs(_decoded(tmp_path / "i32.tiff").astype(int) - EXPECT).max() <= 1
    Image.fromarray(a16.astype(np.int32) - 40000).save(tmp_path / "neg.tiff")
    with pytest.raises(DataError, match=r"values in \[-40000, 25535\], outside \[0, 65535\]"):
        _read_image(tmp_path / "neg.tiff")


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "LA", "RGBA", "1"])
def test_eight_bit_modes(tmp_path, mode, reliability):
    reliability["input"] = f"8-bit PNG of mode {mode}: a ramp 0..255"
    gray = (RAMP * 255).round().astype(np.uint8)
    if mode == "1":
        img = Image.fromarray(gray).convert("1", dither=Image.Dither.NONE)
        want = np.where(gray >= 128, 255, 0)
    else:
        img = Image.fromarray(gray).convert(mode)
        want = gray
    img.save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == mode
    assert np.abs(_decoded(tmp_path / "x.png").astype(int) - want).max() <= 1


# --- decompression bombs ---------------------------------------------------------------------


def one_bit_png(path: Path, side: int) -> Path:
    """A real 1-bit PNG of side x side white pixels: a few tens of KB that decode to side² pixels."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _small(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)


def bomb_folder(root: Path, n_bombs: int = 3, side: int = 12000) -> Path:
    for c in ("a", "b"):
        for i in range(3):
            _small(root / "train" / c / f"{i}.png")
    _small(root / "test" / "b" / "0.png")
    for i in range(n_bombs):
        one_bit_png(root / "test" / "a" / f"bomb{i}.png", side)
    return root


# a data-size limit far below this machine's memory, above what importing torch needs
RLIMIT_DATA = 2 << 30


def run_limited(argv: list[str], tmp_path: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``genaf ARGV`` in a subprocess whose data segment is limited to RLIMIT_DATA bytes."""
    import os

    code = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_DATA, ({RLIMIT_DATA}, {RLIMIT_DATA}))
        from genaf.cli import main
        sys.exit(main({argv!r}))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def test_decompression_bombs_are_refused_from_the_header_in_bounded_memory(tmp_path, reliability):
    """Before: three 12000² 1-bit PNGs (a few KB each) were decoded to RGB, ~430 MB each, and
    resized in float: past the data limit, a traceback."""
    root = bomb_folder(tmp_path / "bombs")
    assert max(p.stat().st_size for p in root.rglob("bomb*.png")) < 100_000
    argv = ["finetune", "--encoder", "random:demo", "--method", "sft", "--dataset", f"imagefolder:{root}",
            "--image-size", "8", "--epochs", "1", "--out", str(tmp_path / "run")]
    r = run_limited(argv, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    reliability.update(
        input="three 12000x12000 1-bit PNGs (<100 KB each) in an image folder, genaf finetune, RLIMIT_DATA 2 GiB",
        outcome="refused cleanly",
        message=(lines[-1] if lines else f"exit {r.returncode}").replace(str(tmp_path), "$TMP"),
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "bomb" in lines[0] and "12000x12000" in lines[0] and "max_image_pixels" in lines[0]


def test_the_pixel_limit_can_be_raised_for_a_trusted_image(tmp_path, reliability):
    reliability.update(
        input="a 300x300 image under max_image_pixels=10000, then 100000", outcome="refused, then read when raised"
    )
    p = one_bit_png(tmp_path / "big.png", 300)
    limits.set_limit("max_image_pixels", 10_000)
    try:
        with pytest.raises(limits.LimitError, match="300x300.*max_image_pixels"):
            _read_image(p)
        limits.set_limit("max_image_pixels", 100_000)
        assert _read_image(p).shape == (3, 300, 300)
    finally:
        limits.reset()


# --- resize only what the splits use -------------------------------------------------------------


@pytest.fixture
def count_resized(monkeypatch):
    import genaf.data.module as module

    seen = []
    real = module._resize

    def counting(x, size):
        seen.append(len(x) if tuple(x.shape[-2:]) != (size, size) else 0)
        return real(x, size)

    monkeypatch.setattr(module, "_resize", counting)
    return seen


def test_only_the_images_of_the_splits_are_resized(tiny_data, count_resized, reliability):
    """Before: the 5,000-image surrogate reserve was resized with every split (5,128 images for
    --image-size 96 --n-train 64 --n-val 32 --n-test 32); now 128, and the reserve's first n when asked."""
    dm = load_dataset("fashion-mnist", image_size=96, n_train=64, n_val=32, n_test=32, seed=0)
    reliability.update(
        input="fashion-mnist --image-size 96 --n-train 64 --n-val 32 --n-test 32",
        outcome="only the used images resized",
        message=f"{sum(count_resized)} images resized (5,128 before: the whole surrogate reserve too)",
    )
    assert sum(count_resized) == 64 + 32 + 32
    assert dm.train.images.shape == (64, 3, 96, 96)
    sur = dm.surrogate(16)
    assert sum(count_resized) == 64 + 32 + 32 + 16
    assert sur.images.shape == (16, 3, 96, 96) and len(dm.surrogate_pool) == 5000
    # the deferred reserve holds the same images an eager resize gives
    assert torch.equal(sur.images, dm.surrogate_pool.images[:16])
    assert torch.equal(sur.indices, dm.surrogate_pool.indices[:16])


def test_image_folder_decodes_only_the_images_its_splits_use(tmp_path, reliability):
    """A broken image in the unused part of an image folder is never opened."""
    root = tmp_path / "task"
    for c in ("a", "b"):
        for i in range(10):
            _small(root / "train" / c / f"{i}.png")
        _small(root / "test" / c / "0.png")
    dm = load_dataset(f"imagefolder:{root}", image_size=8, n_train=4, n_val=2, seed=0)
    used = set(dm.train.indices.tolist()) | set(dm.val.indices.tolist())
    files = sorted((root / "train").rglob("*.png"))
    unused = next(f for i, f in enumerate(files) if i not in used and i not in set(dm.surrogate_pool.indices.tolist()))
    unused.write_bytes(b"not an image")
    again = load_dataset(f"imagefolder:{root}", image_size=8, n_train=4, n_val=2, seed=0)
    assert torch.equal(again.train.images, dm.train.images)
    reliability.update(input="an image folder whose unused image is broken", outcome="unused image never opened")


def test_image_size_above_the_limit_is_refused_in_bounded_memory(tmp_path, reliability):
    """Before: --image-size 100000 went on to allocate 64 x 3 x 10^10 bytes (a traceback)."""
    argv = ["finetune", "--encoder", "random:demo", "--method", "sft", "--n-train", "64", "--n-val", "32",
            "--n-test", "32", "--epochs", "1", "--image-size", "100000", "--out", str(tmp_path / "run")]
    r = run_limited(argv, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    reliability.update(
        input="genaf finetune --image-size 100000 (RLIMIT_DATA 2 GiB)",
        outcome="refused cleanly",
        message=(lines[-1] if lines else f"exit {r.returncode}").replace(str(tmp_path), "$TMP"),
    )
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "max_image_size" in lines[0] and "100000" in lines[0]
