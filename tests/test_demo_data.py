"""The demo's data come with the install: the shipped Fashion-MNIST subset equals the original
files at the recorded indices, and the demo runs on a machine without the system package."""

from pathlib import Path

import numpy as np
import pytest
import torch

from genaf.data import load_dataset
from genaf.data.demo_subset import ASSET, N_RESERVE, _from_asset, subset_indices

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_the_shipped_subset_is_small_and_well_formed():
    assert ASSET.is_file() and ASSET.stat().st_size < 4_000_000
    a = _from_asset()
    assert a["train_images"].shape == (6000, 28, 28) and a["test_images"].shape == (2000, 28, 28)
    tr, te = subset_indices()
    assert np.array_equal(a["train_source_index"], tr.numpy()) and np.array_equal(a["test_source_index"], te.numpy())
    assert len(set(tr.tolist())) == 6000 and len(set(te.tolist())) == 2000


@pytest.mark.skipif(not FASHION.is_dir(), reason="the original Fashion-MNIST files are not installed")
def test_the_subset_equals_the_original_files_and_both_sources_give_the_same_splits(monkeypatch):
    from genaf.data.fashion_mnist import load_fashion_mnist

    tx, ty, sx, sy, _, _ = load_fashion_mnist()
    a = _from_asset()
    assert np.array_equal(a["train_images"], tx[torch.from_numpy(a["train_source_index"]), 0].numpy())
    assert np.array_equal(a["train_labels"], ty[torch.from_numpy(a["train_source_index"])].numpy())
    assert np.array_equal(a["test_images"], sx[torch.from_numpy(a["test_source_index"]), 0].numpy())
    from_files = load_dataset("fashion-mnist-demo", n_train=3000, n_val=1000, seed=1)
    monkeypatch.setattr("genaf.data.demo_subset._from_originals", lambda root: None)
    from_asset = load_dataset("fashion-mnist-demo", n_train=3000, n_val=1000, seed=1)
    assert from_files.info["source"] != from_asset.info["source"]
    for split in ("train", "val", "test", "surrogate_pool"):
        a_, b_ = getattr(from_files, split), getattr(from_asset, split)
        assert torch.equal(a_.images, b_.images) and torch.equal(a_.indices, b_.indices), split
    # its reserve (first 2,000 images) is the full dataset's reserve prefix: no split of either
    full = load_dataset("fashion-mnist", seed=1)
    reserve = set(torch.from_numpy(a["train_source_index"][:N_RESERVE]).tolist())
    assert not reserve & (set(full.train.indices.tolist()) | set(full.val.indices.tolist()))
    assert len(from_asset.surrogate_pool) == N_RESERVE
