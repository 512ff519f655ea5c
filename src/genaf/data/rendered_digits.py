"""``rendered-digits``: an offline image domain other than Fashion-MNIST.

Digits 0–9 drawn with Pillow's built-in TrueType font at random sizes, positions, rotations
and stroke widths, white on black, 28×28 — MNIST-like in format, a different domain from
clothing photographs. Generated deterministically (same images on every machine with the
same Pillow), so cross-domain experiments (surrogate images from one domain, downstream task
from another) run without any download.
"""

from __future__ import annotations

import numpy as np
import torch

N_TRAIN, N_TEST, SIZE = 10000, 2000, 28


def _render(rng: np.random.Generator, digit: int, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    canvas = size * 2
    img = Image.new("L", (canvas, canvas), 0)
    font = ImageFont.load_default(size=int(rng.integers(size * 0.9, size * 1.5)))
    draw = ImageDraw.Draw(img)
    stroke = int(rng.integers(0, 3))
    draw.text(
        (canvas / 2, canvas / 2),
        str(digit),
        fill=int(rng.integers(180, 256)),
        font=font,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=int(rng.integers(180, 256)),
    )
    img = img.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
    dx, dy = rng.integers(-size // 8, size // 8 + 1, size=2)
    left, top = size // 2 + int(dx), size // 2 + int(dy)
    img = img.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    return np.asarray(img, dtype=np.uint8)


def _split(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    imgs = np.stack([_render(rng, int(d), size) for d in labels])
    return torch.from_numpy(imgs).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_rendered_digits(root=None, download=False):
    """(train_x, train_y, test_x, test_y, classes) as uint8 (N, 1, 28, 28) and int64 labels."""
    train_x, train_y = _split(N_TRAIN, 20261127, SIZE)
    test_x, test_y = _split(N_TEST, 20261128, SIZE)
    return train_x, train_y, test_x, test_y, [str(d) for d in range(10)]
