"""CIFAR-10, STL-10, GTSRB and SVHN through torchvision, as raw uint8 tensors.

``load_torchvision_raw(name, root, download) -> (train_x, train_y, test_x, test_y, classes)``.
Files are looked for under ``root`` (default ``~/.cache/genaf/data``) in torchvision's own
layout; nothing is downloaded unless ``download`` is true.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, unknown

DEFAULT_ROOT = Path.home() / ".cache" / "genaf" / "data"
NAMES = ("cifar10", "stl10", "gtsrb", "svhn")
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_PRETTY = {"cifar10": "CIFAR-10", "stl10": "STL-10", "gtsrb": "GTSRB", "svhn": "SVHN"}


def default_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a Path, or the default cache folder when it is None/empty."""
    return Path(root).expanduser() if root else DEFAULT_ROOT


def _labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y, dtype=np.int64))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))


def _pil_to_chw(img) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _cifar10(root: str, download: bool):
    from torchvision.datasets import CIFAR10

    train = CIFAR10(root, train=True, download=download)
    test = CIFAR10(root, train=False, download=download)
    tx = _nchw(np.asarray(train.data).transpose(0, 3, 1, 2))
    sx = _nchw(np.asarray(test.data).transpose(0, 3, 1, 2))
    return tx, _labels(train.targets), sx, _labels(test.targets), list(train.classes)


def _stl10(root: str, download: bool):
    from torchvision.datasets import STL10

    train = STL10(root, split="train", download=download)
    test = STL10(root, split="test", download=download)
    classes = list(getattr(train, "classes", None) or STL10_CLASSES)
    return _nchw(train.data), _labels(train.labels), _nchw(test.data), _labels(test.labels), classes


def _svhn(root: str, download: bool):
    try:
        import scipy.io  # noqa: F401  (torchvision's SVHN reader needs it)
    except ImportError as exc:
        msg = "SVHN needs SciPy to read its .mat files; install it with 'pip install scipy'"
        raise DataError(msg) from exc
    from torchvision.datasets import SVHN

    train = SVHN(root, split="train", download=download)
    test = SVHN(root, split="test", download=download)
    classes = [str(i) for i in range(10)]
    return _nchw(train.data), _labels(train.labels), _nchw(test.data), _labels(test.labels), classes


def _gtsrb(root: str, download: bool):
    from torchvision.datasets import GTSRB

    out = []
    for split in ("train", "test"):
        ds = GTSRB(root, split=split, download=download)
        # torchvision numbers training classes by their position among the folders present;
        # the folder name (00000..00042) is the real class id, which matters if some are missing
        paths = [str(p) for p, _ in getattr(ds, "_samples", [])]
        images, labels = [], []
        for i in range(len(ds)):
            img, target = ds[i]
            images.append(_pil_to_chw(img))
            folder = Path(paths[i]).parent.name if split == "train" and len(paths) == len(ds) else ""
            labels.append(int(folder) if folder.isdigit() else int(target))
        out += [images, _labels(labels)]
    return out[0], out[1], out[2], out[3], [str(i) for i in range(43)]


_LOADERS = {"cifar10": _cifar10, "stl10": _stl10, "gtsrb": _gtsrb, "svhn": _svhn}


def load_torchvision_raw(name: str, root: str | os.PathLike | None = None, download: bool = False):
    """Return (train_x, train_y, test_x, test_y, classes) for a torchvision dataset.

    Images are uint8 (N, 3, H, W), or a list of (3, H, W) tensors for GTSRB whose image
    sizes differ. Raises DataError when the files are missing or a download fails.
    """
    if name not in _LOADERS:
        raise unknown("torchvision dataset", str(name), NAMES)
    where = default_root(root)
    pretty = _PRETTY[name]
    try:
        return (*_LOADERS[name](str(where), bool(download)), str(where.resolve()))
    except DataError:
        raise
    except Exception as exc:
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        if download:
            raise DataError(
                f"downloading {pretty} into {where} failed ({cause}); check the network, or pass "
                "--data-root DIR holding the torchvision files"
            ) from exc
        raise DataError(
            f"{pretty} not found or unreadable in {where} ({cause}); pass --data-root DIR holding the "
            "torchvision files, or add --download"
        ) from exc
