"""Fashion-MNIST from the Debian IDX files, corrupt IDX files, and unknown dataset names."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from genaf.data import load_dataset
from genaf.data.fashion_mnist import FILES
from genaf.errors import DataError, SpecError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_files = pytest.mark.skipif(
    not all((DEBIAN / (stem + ".gz")).is_file() for stems in FILES.values() for stem in stems),
    reason="Fashion-MNIST IDX files are not installed under /usr/share/datasets/fashion-mnist",
)


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist", n_train=100, n_val=50, n_test=100, seed=0)


@needs_files
def test_fashion_mnist_splits(fmnist):
    dm = fmnist
    assert dm.num_classes == 10 and dm.image_size == 28
    assert (len(dm.train), len(dm.val), len(dm.test)) == (100, 50, 100)
    assert len(dm.surrogate_pool) == 5000  # the reserve: 10 % of the training split, at most 5,000
    for s in (dm.train, dm.val, dm.test, dm.surrogate_pool):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 28, 28)
        assert torch.equal(s.images[:, 0], s.images[:, 1]) and torch.equal(s.images[:, 1], s.images[:, 2])
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) <= 9
    tr, va, po = (set(s.indices.tolist()) for s in (dm.train, dm.val, dm.surrogate_pool))
    assert not (tr & va) and not (tr & po) and not (va & po)
    assert len(tr | va | po) == 5150 and tr | va | po <= set(range(60000))
    assert int(dm.test.indices.max()) < 10000
    assert len(set(dm.test.indices.tolist())) == 100


@needs_files
def test_fashion_mnist_resized(fmnist):
    dm = load_dataset("fashion-mnist", image_size=32, n_train=100, n_val=50, n_test=100, seed=0)
    assert dm.image_size == 32 and dm.train.images.shape == (100, 3, 32, 32)
    # same seed -> same split regardless of the image size
    assert torch.equal(dm.train.indices, fmnist.train.indices)
    assert torch.equal(dm.train.labels, fmnist.train.labels)


def _idx(dims: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def test_truncated_idx_is_a_data_error(tmp_path):
    (train_x, train_y), (test_x, test_y) = FILES["train"], FILES["test"]
    good = {
        train_x: _idx((2, 28, 28), bytes(2 * 28 * 28)),
        train_y: _idx((2,), bytes(2)),
        test_x: _idx((2, 28, 28), bytes(2 * 28 * 28)),
        test_y: _idx((2,), bytes(2)),
    }
    good[train_x] = good[train_x][:-100]  # truncated payload
    for stem, data in good.items():
        with gzip.open(tmp_path / (stem + ".gz"), "wb") as fh:
            fh.write(data)
    with pytest.raises(DataError, match="truncated or corrupt") as ei:
        load_dataset("fashion-mnist", root=str(tmp_path))
    assert train_x in str(ei.value)


def test_broken_gzip_is_a_data_error(tmp_path):
    for stems in FILES.values():
        for stem in stems:
            with gzip.open(tmp_path / (stem + ".gz"), "wb") as fh:
                fh.write(_idx((1,), bytes(1)))
    path = tmp_path / (FILES["train"][0] + ".gz")
    path.write_bytes(path.read_bytes()[:12])  # cut inside the gzip stream
    with pytest.raises(DataError, match="cannot read IDX file"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_unknown_dataset_name():
    with pytest.raises(SpecError, match="did you mean 'fashion-mnist'"):
        load_dataset("fasion-mnist")
