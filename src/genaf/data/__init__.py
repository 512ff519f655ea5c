"""Downstream datasets as in-memory uint8 tensors with seeded train/val/test splits.

``load_dataset(spec, ...) -> DataModule``. Specs: ``fashion-mnist``, ``cifar10``, ``stl10``,
``gtsrb``, ``svhn`` (torchvision-backed, ``root=``, download only when asked) and
``imagefolder:PATH`` (PATH holds ``train/`` and ``test/`` with one sub-folder per class).

Images are kept as uint8 NCHW tensors (3 channels: grayscale is expanded) at the requested
size, and converted to float [0,1] per batch. A seeded validation split is carved from the
training data and used for every selection decision; the test split is only for final
numbers. Training images used by neither split form the *surrogate pool*, disjoint from
every downstream split, from which attacks may draw.
"""

from __future__ import annotations

from .module import DATASETS, DataModule, ImageSet, load_dataset

__all__ = ["DataModule", "ImageSet", "load_dataset", "DATASETS"]
