"""A downstream dataset from an image folder: ``PATH/{train,test}/<class>/<image>``.

Classes are the sub-folder names of ``train/`` sorted by name; ``test/`` may lack some of
them but must not add new ones. Every image is decoded with PIL, by the real range of its mode
(see ``RULES``), and converted to RGB; only the images the splits use are decoded, each checked
against the limit ``max_image_pixels`` from its header first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .. import limits
from ..errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".pbm", ".gif", ".tif", ".tiff", ".pfm"}
_LAYOUT = "one folder per class inside each"


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
    )


# PIL modes by the range their values really have (decoded to [0, 1], stored as uint8):
EIGHT_BIT = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
# "I" (32-bit signed integers) is read as 16-bit: Pillow gives "I" to 16-bit grayscale PNG, PGM
# and TIFF files, so [0, 65535] maps to [0, 1]; values outside that range are refused (no 32-bit
# integer format has a range genaf could know). "F" (32-bit float: PFM, float TIFF) is taken as is
# when it lies in [0, 1] and refused otherwise, like non-finite pixels.
RULES = (
    "8-bit modes /255, 16-bit (I;16) /65535, 32-bit integer (I) as 16-bit /65535 with values in [0, 65535], "
    "float (F) as is with values in [0, 1]"
)


def _check_pixels(img, path: Path) -> None:
    """Refuse an image larger than the limit from its header, before anything is decoded."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DataError(f"image {path} is {w}x{h} pixels; delete or replace the file")
    limits.check("max_image_pixels", w * h, f"image {path} ({w}x{h} pixels)")


def _to_unit(img, path: Path) -> np.ndarray:
    """The decoded image as a float32 (H, W) or (H, W, 3) array in [0, 1], by its mode's range."""
    from PIL import Image

    mode = img.mode
    if mode in EIGHT_BIT:
        if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
            # flatten transparency onto white rather than letting convert() drop it to black
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)  # uint8: already the right range
    if mode in SIXTEEN_BIT or mode == "I":
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DataError(
                f"image {path} is 32-bit integer (mode I) with values in [{lo}, {hi}], outside [0, 65535]: genaf "
                "reads such images as 16-bit; save it as 8- or 16-bit, or as float in [0, 1]"
            )
        return arr.astype(np.float32) / 65535.0
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DataError(
                f"image {path} has {int(bad.sum())} non-finite (NaN or inf) pixel(s); delete or repair the file"
            )
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise DataError(
                f"image {path} is float (mode F) with values in [{lo:.6g}, {hi:.6g}]; genaf takes float images as "
                "[0, 1] intensities: rescale it to [0, 1] or save it as 8/16-bit"
            )
        return arr
    raise DataError(f"image {path} has PIL mode '{mode}', which genaf does not decode ({RULES}); save it as RGB or L")


def _read_image(path: Path) -> torch.Tensor:
    """Decode one image to a uint8 (3, H, W) tensor, each PIL mode by its real range (see RULES);
    its size is checked against the limit max_image_pixels before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    old = Image.MAX_IMAGE_PIXELS
    try:
        # genaf's own limit, checked on the header below before decoding, replaces PIL's bomb
        # check (a warning past 89 Mpixel, an error past 179), so that --limit can raise it
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, path)
                img.load()
                arr = _to_unit(img, path)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, EOFError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image {path}: {msg}; delete or replace the file") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if arr.dtype != np.uint8:
        arr = np.round(arr * np.float32(255.0)).clip(0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {path} decoded to an unexpected shape {arr.shape}; delete or replace the file")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class ImageFile:
    """One image of the folder, decoded only when a split uses it (``load()``)."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> torch.Tensor:
        return _read_image(self.path)

    def __repr__(self) -> str:
        return f"ImageFile({str(self.path)!r})"


def _read_split(root: Path, split: str, classes: list[str]) -> tuple[list[ImageFile], torch.Tensor]:
    images: list[ImageFile] = []
    labels: list[int] = []
    split_dir = root / split
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for f in _image_files(class_dir):
            images.append(ImageFile(f))
            labels.append(label)
    if not images:
        raise DataError(
            f"image folder {root}: {split}/ holds no images (extensions {', '.join(sorted(EXTENSIONS))}); "
            f"put images in {split}/<class>/, {_LAYOUT}"
        )
    return images, torch.tensor(labels, dtype=torch.long)


def load_imagefolder_raw(path: str | os.PathLike, image_size: int | None = None):
    """Return (train_x, train_y, test_x, test_y, classes) with images as lists of :class:`ImageFile`
    (decoded to uint8 (3, H, W) by ``load()``, which ``load_dataset`` calls for the images its splits use).

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
