"""Fixtures for the encoder-loading tests (helpers live in enc_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from enc_helpers import tv_cifar_resnet18, tv_resnet18
from torch import nn


@pytest.fixture(scope="module")
def cifar_tv_model() -> nn.Module:
    return tv_cifar_resnet18(seed=0)


@pytest.fixture(scope="module")
def imagenet_tv_model() -> nn.Module:
    return tv_resnet18(seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster and leaves the other cores alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
