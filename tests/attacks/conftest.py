"""Shared fixtures of the attack tests."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mlp():
    """A seeded MLP on single-channel Fashion-MNIST, trained for a few seconds, and 500 test points."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    from genaf.data import load_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_dataset("fashion-mnist", n_train=3000, n_val=50, n_test=500, seed=0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            for xb, yb, _ in data.train.batches(128, shuffle=True, gen=gen):
                opt.zero_grad()
                F.cross_entropy(model(xb[:, :1]), yb).backward()
                opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    finally:
        torch.set_num_threads(threads)
    return model, data.test.float_images()[:, :1], data.test.labels
