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


class SmallNet(nn.Module):
    """A small classifier with BatchNorm and dropout, so a train-mode forward would differ."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(6 * 8 * 8, 10),
        )

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def tiny_classifier():
    """A factory of ``(model, x, y)``: a seeded :class:`SmallNet` left in train mode, 24 RGB 8×8
    points (the first four rounded to 0/1 pixels, to exercise the [0,1] clipping) and labels equal
    to the net's predictions except for the first ``n_wrong`` (misclassified on clean input)."""

    def make(n_wrong: int = 6):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = SmallNet()
            x = torch.rand(24, 3, 8, 8)
            x[:4] = x[:4].round()
        with torch.no_grad():
            model.eval()
            y = model(x).argmax(1)
            y[:n_wrong] = (y[:n_wrong] + 1) % 10
        model.train()
        return model, x, y

    return make
