"""Fashion-MNIST read straight from the original gzipped IDX files (no download needed).

Debian's ``dataset-fashion-mnist`` package installs them under
``/usr/share/datasets/fashion-mnist/``; torchvision expects unpacked files and would try to
download, so genaf reads the ``.gz`` files itself.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

# Where Debian's dataset-fashion-mnist puts the files; $GENAF_SYSTEM_FASHION_MNIST names another
# system location (an empty folder stands for a machine without the package).
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a NumPy array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims)) + 4 + 4 * ndim
    if len(data) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, "FashionMNIST/raw/" + stem, "FashionMNIST/raw/" + stem + ".gz"):
        p = root / name
        if p.is_file():
            return p
    return None


def candidate_roots(root: str | os.PathLike | None) -> tuple[list[Path], str]:
    """Where to look, and who asked: an explicit ``root`` is the only place looked at (and its
    ``fashion-mnist/`` sub-folder); else ``$GENAF_FASHION_MNIST`` alone; else the Debian folder.
    A place that was asked for and does not hold the files is an error, never a fallback."""
    if root:
        return [Path(root).expanduser(), Path(root).expanduser() / "fashion-mnist"], f"--data-root {root}"
    env = os.environ.get("GENAF_FASHION_MNIST")
    if env:
        return [Path(env).expanduser()], f"GENAF_FASHION_MNIST={env}"
    return [Path(os.environ.get("GENAF_SYSTEM_FASHION_MNIST") or DEBIAN_ROOT)], ""


def load_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False):
    """Return (train_x, train_y, test_x, test_y, classes, source); images uint8 (N, 1, 28, 28);
    ``source`` is the folder the files were read from."""
    roots, asked = candidate_roots(root)
    for r in roots:
        paths = {split: [_find(r, stem) for stem in stems] for split, stems in FILES.items()}
        if all(p is not None for ps in paths.values() for p in ps):
            out = []
            for split in ("train", "test"):
                x = read_idx(paths[split][0])
                y = read_idx(paths[split][1])
                if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                    raise DataError(f"Fashion-MNIST {split} files in {r} have inconsistent shapes {x.shape}, {y.shape}")
                out += [torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
            return out[0], out[1], out[2], out[3], list(CLASSES), str(paths["train"][0].parent.resolve())
    if download:
        from torchvision.datasets import FashionMNIST

        target = Path(root or Path.home() / ".cache" / "genaf" / "data")
        try:
            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
        except Exception as exc:
            raise DataError(f"downloading Fashion-MNIST into {target} failed: {exc}") from exc
        return load_fashion_mnist(target, download=False)
    tried = ", ".join(str(r) for r in roots)
    if asked:
        raise DataError(
            f"{asked} was asked for but holds no Fashion-MNIST IDX files (looked in {tried}; "
            "expected train-images-idx3-ubyte[.gz] and the three others); point it at the folder that holds them"
        )
    raise DataError(
        f"Fashion-MNIST IDX files not found (looked in {tried}); install them with "
        "'apt-get install -y dataset-fashion-mnist', pass --data-root DIR, or add --download"
    )
