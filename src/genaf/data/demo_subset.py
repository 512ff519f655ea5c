"""``fashion-mnist-demo``: the fixed 8,000-image subset of Fashion-MNIST the demo runs on,
shipped with the package so that ``genaf demo`` needs no system package and no network.

What it holds (``src/genaf/assets/fashion-mnist-demo.npz.xz``, 3 MB):

- 6,000 images of Fashion-MNIST's training split. The first 2,000 are the *surrogate reserve*
  of this dataset (they are also the first 2,000 of the full dataset's reserve, so they lie in
  no downstream split of ``fashion-mnist`` either); the other 4,000 are drawn from the rest of
  the full dataset's non-reserve images, and the demo's train/validation splits are cut from
  them with the run's seed.
- 2,000 images of Fashion-MNIST's test split (a seeded random choice).
- The index of every image in the original IDX files (``train_source_index``,
  ``test_source_index``), so the subset can be checked against (or rebuilt from) the originals.

When the original IDX files are present (``--data-root``, ``$GENAF_FASHION_MNIST``, or the
Debian package ``dataset-fashion-mnist``), the images are read from them at those indices; else
from the shipped file. Both give the same tensors (``tests/test_demo_data.py``); which one was
read is recorded as the dataset's ``source``.

Provenance and licence: Fashion-MNIST, Han Xiao, Kashif Rasul and Roland Vollgraf, "Fashion-
MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms" (2017), Zalando
Research, https://github.com/zalandoresearch/fashion-mnist, released under the MIT licence
(copyright (c) 2017 Zalando SE). The subset is a verbatim copy of 8,000 of its images and labels.

Rebuild it from the original files with ``python -m genaf.data.demo_subset --build``.
"""

from __future__ import annotations

import io
import lzma
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

ASSET = Path(__file__).resolve().parents[1] / "assets" / "fashion-mnist-demo.npz.xz"
N_RESERVE = 2000
N_POOL = 4000  # train/validation images, split by the run's seed
N_TEST = 2000
KEYS = ("train_images", "train_labels", "test_images", "test_labels", "train_source_index", "test_source_index")


def subset_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """(training-split indices, test-split indices) of the subset in the original IDX files."""
    from ..utils import generator
    from .module import default_reserve, reserve_order

    order = reserve_order(60000)
    full_reserve = default_reserve(60000)
    train = torch.cat([order[:N_RESERVE], order[full_reserve : full_reserve + N_POOL]])
    test = torch.randperm(10000, generator=generator(0, "fashion-mnist-demo:test"))[:N_TEST].sort().values
    return train, test


def _from_originals(root) -> dict | None:
    from .fashion_mnist import load_fashion_mnist

    try:
        tx, ty, sx, sy, _classes, source = load_fashion_mnist(root, download=False)
    except DataError:
        if root:
            raise  # a root that was asked for and lacks the files is an error, never a fallback
        return None
    tr, te = subset_indices()
    return {
        "train_images": tx[tr, 0].numpy(),
        "train_labels": ty[tr].numpy().astype(np.int64),
        "test_images": sx[te, 0].numpy(),
        "test_labels": sy[te].numpy().astype(np.int64),
        "train_source_index": tr.numpy().astype(np.int64),
        "test_source_index": te.numpy().astype(np.int64),
        "source": source,
    }


def _from_asset(path: Path = ASSET) -> dict:
    if not path.is_file():
        raise DataError(
            f"the demo's Fashion-MNIST subset {path} is missing from this install and the original files were not "
            "found; reinstall genaf, or install them with 'apt-get install -y dataset-fashion-mnist'"
        )
    try:
        with np.load(io.BytesIO(lzma.decompress(path.read_bytes())), allow_pickle=False) as z:
            arrays = {k: z[k] for k in KEYS}
    except (lzma.LZMAError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"the demo's Fashion-MNIST subset {path} is damaged ({exc}); reinstall genaf") from exc
    expect = {"train_images": (N_RESERVE + N_POOL, 28, 28), "test_images": (N_TEST, 28, 28)}
    for k, shape in expect.items():
        if arrays[k].shape != shape or arrays[k].dtype != np.uint8:
            raise DataError(f"the demo's Fashion-MNIST subset {path} holds {k} {arrays[k].shape}; reinstall genaf")
    return {**arrays, "source": f"package data {path.name}"}


def load_demo_subset(root=None, download: bool = False):
    """(train_x, train_y, test_x, test_y, classes, info) for ``fashion-mnist-demo``; ``info``
    names the source read and fixes the surrogate reserve (the first 2,000 training images)."""
    from .fashion_mnist import CLASSES

    arrays = _from_originals(root) or _from_asset()
    info = {
        "source": arrays["source"],
        "fixed_reserve": N_RESERVE,
        "source_indices": {
            "train": arrays["train_source_index"].tolist(),
            "test": arrays["test_source_index"].tolist(),
        },
    }
    return (
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].copy()),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].copy()),
        list(CLASSES),
        info,
    )


def build_asset(root=None, path: Path = ASSET) -> Path:
    """Write the shipped file from the original IDX files (``python -m genaf.data.demo_subset --build``)."""
    arrays = _from_originals(root)
    if arrays is None:
        raise DataError("the original Fashion-MNIST IDX files are needed to build the demo subset")
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in KEYS})
    data = lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    from ..utils import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    if "--build" in sys.argv:
        print(build_asset())
