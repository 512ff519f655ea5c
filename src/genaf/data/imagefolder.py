"""A downstream dataset from an image folder: ``PATH/{train,test}/<class>/<image>``.

Classes are the sub-folder names of ``train/`` sorted by name; ``test/`` may lack some of
them but must not add new ones. Every image is decoded with PIL and converted to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".gif"}
_LAYOUT = "one folder per class inside each"


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
    )


def _read_image(path: Path) -> torch.Tensor:
    """Decode one image to a uint8 (3, H, W) tensor."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # flatten transparency onto white rather than letting convert() drop it to black
                rgba = img.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(bg, rgba).convert("RGB")
            elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16/32-bit grayscale: scale to 8 bits instead of clipping
                arr = np.asarray(img, dtype=np.float64)
                hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
                arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
                rgb = Image.fromarray(arr8, mode="L").convert("RGB")
            else:
                rgb = img.convert("RGB")
            arr = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image {path}: {msg}; delete or replace the file") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {path} decoded to an unexpected shape {arr.shape}; delete or replace the file")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _read_split(root: Path, split: str, classes: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    images: list[torch.Tensor] = []
    labels: list[int] = []
    split_dir = root / split
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for f in _image_files(class_dir):
            images.append(_read_image(f))
            labels.append(label)
    if not images:
        raise DataError(
            f"image folder {root}: {split}/ holds no images (extensions {', '.join(sorted(EXTENSIONS))}); "
            f"put images in {split}/<class>/, {_LAYOUT}"
        )
    return images, torch.tensor(labels, dtype=torch.long)


def load_imagefolder_raw(path: str | os.PathLike, image_size: int | None = None):
    """Return (train_x, train_y, test_x, test_y, classes) with images as lists of uint8 (3, H, W).

    ``image_size`` is accepted for the loader interface; resizing is done by ``load_dataset``.
    """
    del image_size
    if not str(path).strip():
        raise DataError("imagefolder: needs a path, e.g. imagefolder:/data/mytask")
    root = Path(path).expanduser()
    fix = "pass imagefolder:PATH where PATH holds train/ and test/"
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; {fix}")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory; {fix}")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"image folder {root} must contain train/ and test/ sub-folders, {_LAYOUT} "
            f"(missing: {', '.join(s + '/' for s in missing)})"
        )
    classes = _class_dirs(root / "train")
    test_classes = _class_dirs(root / "test")
    for split, found in (("train", classes), ("test", test_classes)):
        if not found:
            raise DataError(
                f"image folder {root}: {split}/ has no class folders; put images in {split}/<class>/, {_LAYOUT}"
            )
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise DataError(
            f"image folder {root}: test/ has class folder(s) {', '.join(extra)} that train/ lacks; "
            "use the same class folder names in both"
        )
    train_x, train_y = _read_split(root, "train", classes)
    test_x, test_y = _read_split(root, "test", classes)
    return train_x, train_y, test_x, test_y, classes
