"""torchvision-backed datasets, exercised with a fake CIFAR-10 written in torchvision's format."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from genaf.data import load_dataset
from genaf.data.torchvision_sets import load_torchvision_raw
from genaf.errors import DataError, SpecError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(root, per_batch: int = 8, n_test: int = 10, seed: int = 0):
    """Write cifar-10-batches-py/ exactly as torchvision's CIFAR10 reads it (latin1 pickles)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = n_test if name == "test_batch" else per_batch
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(d / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return d


@pytest.fixture
def no_md5(monkeypatch):
    """The fake files cannot match torchvision's md5 sums: accept any file that exists."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to download."""
    import torchvision.datasets.cifar as cifar

    def boom(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(cifar, "download_and_extract_archive", boom)


def test_fake_cifar10_loads(tmp_path, no_md5, no_network):
    d = write_fake_cifar10(tmp_path)
    dm = load_dataset("cifar10", root=str(tmp_path), n_train=20, n_val=8, n_test=6, seed=0)
    assert dm.classes == CIFAR_CLASSES
    assert dm.image_size == 32
    for s in (dm.train, dm.val, dm.test, dm.surrogate_pool):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 32, 32)
    assert (len(dm.train), len(dm.val), len(dm.test), len(dm.surrogate_pool)) == (20, 8, 6, 4)
    idx = [set(s.indices.tolist()) for s in (dm.train, dm.val, dm.surrogate_pool)]
    assert set().union(*idx) <= set(range(40)) and len(set().union(*idx)) == sum(map(len, idx)) == 32

    # pixel layout: NCHW tensor == torchvision's (N, 3072) rows reshaped to (3, 32, 32)
    with open(d / "data_batch_1", "rb") as fh:
        first = pickle.load(fh, encoding="latin1")
    raw = load_torchvision_raw("cifar10", str(tmp_path), download=False)
    tx, ty, sx, sy, classes = raw[:5]
    assert tx.shape == (40, 3, 32, 32) and sx.shape == (10, 3, 32, 32)
    assert torch.equal(tx[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert ty[:8].tolist() == first["labels"] and ty.dtype == torch.int64


def test_cifar10_resized(tmp_path, no_md5):
    write_fake_cifar10(tmp_path)
    dm = load_dataset("cifar10", root=str(tmp_path), image_size=16, n_train=10, n_val=5)
    assert dm.train.images.shape == (10, 3, 16, 16) and dm.image_size == 16


def test_missing_files_are_a_data_error(tmp_path, no_network):
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", root=str(tmp_path / "empty"))
    msg = str(ei.value)
    assert "CIFAR-10" in msg and str(tmp_path / "empty") in msg
    assert "--data-root" in msg and "--download" in msg
    assert "\n" not in msg


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="downloading CIFAR-10 .* failed .*network is unreachable"):
        load_dataset("cifar10", root=str(tmp_path), download=True)


def test_unknown_torchvision_name():
    with pytest.raises(SpecError, match="did you mean 'cifar10'"):
        load_torchvision_raw("cifar1O", None, False)


def test_fake_stl10_loads(tmp_path, monkeypatch):
    import torchvision.datasets.stl10 as stl10

    monkeypatch.setattr(stl10, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    rng = np.random.default_rng(0)
    d = tmp_path / "stl10_binary"
    d.mkdir()
    arrays = {}
    for split, n in (("train", 6), ("test", 4)):
        arrays[split] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        arrays[split].tofile(d / f"{split}_X.bin")
        (np.arange(n, dtype=np.uint8) % 10 + 1).tofile(d / f"{split}_y.bin")  # 1-based on disk
    (d / "unlabeled_X.bin").write_bytes(b"")
    tx, ty, sx, sy, classes = load_torchvision_raw("stl10", str(tmp_path), download=False)[:5]
    assert tx.shape == (6, 3, 96, 96) and sx.shape == (4, 3, 96, 96) and tx.dtype == torch.uint8
    # the binary files are column-major: torchvision transposes H and W, and so must we
    assert torch.equal(tx, torch.from_numpy(arrays["train"].transpose(0, 1, 3, 2).copy()))
    assert ty.tolist() == [0, 1, 2, 3, 4, 5] and sy.dtype == torch.int64
    assert len(classes) == 10 and classes[0] == "airplane"


def test_fake_gtsrb_loads(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    base = tmp_path / "gtsrb" / "GTSRB"
    for cls, sizes in (("00000", [(30, 31), (40, 35)]), ("00002", [(33, 33)])):
        (base / "Training" / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(base / "Training" / cls / f"{i:05d}.ppm")
    (base / "Final_Test" / "Images").mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, (w, h, c) in enumerate([(29, 30, 42), (50, 41, 0)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            base / "Final_Test" / "Images" / f"{i:05d}.ppm"
        )
        rows.append(f"{i:05d}.ppm;{w};{h};0;0;{w};{h};{c}")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")

    tx, ty, sx, sy, classes = load_torchvision_raw("gtsrb", str(tmp_path), download=False)[:5]
    assert isinstance(tx, list) and [tuple(t.shape) for t in tx] == [(3, 31, 30), (3, 35, 40), (3, 33, 33)]
    assert all(t.dtype == torch.uint8 for t in tx + sx)
    assert ty.tolist() == [0, 0, 2]  # the folder name is the class id, even with 00001 absent
    assert sy.tolist() == [42, 0] and len(classes) == 43 and classes[42] == "42"
    dm = load_dataset("gtsrb", root=str(tmp_path), image_size=24, n_val=1, seed=0)
    assert dm.train.images.shape == (2, 3, 24, 24) and dm.test.images.shape == (2, 3, 24, 24)
    with pytest.raises(DataError, match="several sizes"):
        load_dataset("gtsrb", root=str(tmp_path), n_val=1)
