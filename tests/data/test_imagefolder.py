"""imagefolder:PATH datasets built from tiny PNG folders in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genaf.data import load_dataset
from genaf.errors import DataError

CLASSES = ["ant", "bee", "cat"]


def _save(path, mode: str, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").convert("P")
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
    img.save(path)


def make_folder(root, n_train: int = 6, n_test: int = 2):
    modes = ["RGB", "L", "RGBA", "P"]
    sizes = [(20, 18), (12, 12), (16, 24), (9, 30)]
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        # class folders deliberately created out of order: classes must come back sorted
        for name in reversed(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                ext = ".PNG" if i == 0 else ".png"
                _save(d / f"img{i}{ext}", modes[k % 4], sizes[k % 4], k)
                k += 1
            (d / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "task")


def test_load_shapes_labels_and_classes(folder):
    dm = load_dataset(f"imagefolder:{folder}", image_size=16, n_val=2, seed=0)
    assert dm.classes == CLASSES
    assert dm.num_classes == 3
    assert dm.image_size == 16
    for s in (dm.train, dm.val, dm.test, dm.surrogate_pool):
        assert s.images.dtype == torch.uint8
        assert s.images.shape[1:] == (3, 16, 16)
        if len(s):
            assert int(s.labels.min()) >= 0 and int(s.labels.max()) < 3
    assert len(dm.val) == 2
    assert len(dm.surrogate_pool) == 1  # the surrogate reserve: 10 % of the 18 training images
    assert len(dm.train) == 18 - 1 - 2
    assert len(dm.test) == 6
    assert sorted(dm.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    root = tmp_path / "gray"
    for k, (split, c) in enumerate([(s, c) for s in ("train", "test") for c in ("a", "b")]):
        (root / split / c).mkdir(parents=True)
        _save(root / split / c / "x.png", "L", (8, 8), k)
    dm = load_dataset(f"imagefolder:{root}", n_val=1, seed=0)
    x = dm.train.images
    assert x.shape[1:] == (3, 8, 8)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_splits_disjoint_and_seeded(folder):
    spec = f"imagefolder:{folder}"
    dm = load_dataset(spec, image_size=16, n_train=10, n_val=3, seed=0)
    val, train, pool = (set(s.indices.tolist()) for s in (dm.val, dm.train, dm.surrogate_pool))
    assert len(val) == 3 and len(train) == 10 and len(pool) == 1
    assert not (val & train) and not (val & pool) and not (train & pool)
    assert val | train | pool <= set(range(18))
    again = load_dataset(spec, image_size=16, n_train=10, n_val=3, seed=0)
    assert torch.equal(again.val.indices, dm.val.indices)
    assert torch.equal(again.train.indices, dm.train.indices)
    assert torch.equal(again.train.images, dm.train.images)
    other = load_dataset(spec, image_size=16, n_train=10, n_val=3, seed=1)
    assert not torch.equal(other.train.indices, dm.train.indices)
    # images follow their source index whatever the seed
    a = dict(zip(dm.train.indices.tolist(), dm.train.images))
    b = dict(zip(other.train.indices.tolist(), other.train.images))
    shared = set(a) & set(b)
    assert shared and all(torch.equal(a[i], b[i]) for i in shared)


def test_mixed_sizes_without_image_size_is_an_error(folder):
    with pytest.raises(DataError, match="several sizes"):
        load_dataset(f"imagefolder:{folder}", n_val=2)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as ei:
        load_dataset(f"imagefolder:{missing}", image_size=16)
    assert str(missing) in str(ei.value)


def test_folder_without_test(tmp_path):
    root = tmp_path / "only_train"
    (root / "train" / "a").mkdir(parents=True)
    _save(root / "train" / "a" / "x.png", "RGB", (8, 8), 0)
    with pytest.raises(DataError, match="must contain train/ and test/ sub-folders") as ei:
        load_dataset(f"imagefolder:{root}", image_size=16)
    assert "test/" in str(ei.value).split("missing:")[1]


def test_corrupt_image_named(folder):
    bad = folder / "train" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="cannot read image") as ei:
        load_dataset(f"imagefolder:{folder}", image_size=16)
    assert "broken.png" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_class_only_in_test(folder):
    (folder / "test" / "dog").mkdir()
    _save(folder / "test" / "dog" / "x.png", "RGB", (8, 8), 0)
    with pytest.raises(DataError, match="dog"):
        load_dataset(f"imagefolder:{folder}", image_size=16)


def test_split_without_class_folders_or_images(tmp_path):
    root = tmp_path / "empty"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"imagefolder:{root}", image_size=16)
    (root / "train" / "a").mkdir()
    (root / "test" / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(f"imagefolder:{root}", image_size=16)
