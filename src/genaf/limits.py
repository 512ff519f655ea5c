"""Resource limits for reading files genaf did not write itself.

A small hostile file must not be able to make genaf allocate gigabytes: every reader checks what
a file *claims* (tensor sizes, widths, class counts, image pixels) against these limits *before*
allocating. Each limit has a default meant for real encoders and datasets and can be raised, for a
file you trust, with the environment variable ``GENAF_LIMIT_<NAME>`` (e.g.
``GENAF_LIMIT_MAX_IMAGE_PIXELS=400000000``) or the command line's ``--limit NAME=VALUE``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import GenafError


class LimitError(GenafError):
    """An input claims more than a limit allows; the message names the limit and how to raise it."""


@dataclass(frozen=True)
class Limit:
    name: str
    default: int
    unit: str
    help: str


# Defaults: generous for real public encoders and datasets, far below what would exhaust a laptop.
LIMITS: dict[str, Limit] = {
    lim.name: lim
    for lim in (
        Limit("max_tensor_bytes", 4 << 30, "bytes", "largest single tensor a weight file may declare"),
        Limit("max_file_expansion", 64, "×", "bytes a file may declare (or inflate to) per byte on disk"),
        Limit("max_file_bytes", 16 << 30, "bytes", "largest total a weight file may declare"),
        Limit("max_width", 1024, "channels", "largest base width of an encoder described by metadata"),
        Limit("max_num_classes", 100_000, "classes", "largest number of classes of a head or dataset"),
        Limit("max_image_pixels", 64_000_000, "pixels", "largest image (width × height) decoded"),
        Limit("max_image_size", 1024, "pixels", "largest --image-size side length"),
    )
}

_overrides: dict[str, int] = {}


def get(name: str) -> int:
    """The limit in force: ``--limit`` override, else ``$GENAF_LIMIT_<NAME>``, else the default."""
    if name not in LIMITS:
        from .errors import unknown

        raise unknown("limit", name, LIMITS)
    if name in _overrides:
        return _overrides[name]
    env = os.environ.get(f"GENAF_LIMIT_{name.upper()}")
    if env:
        return _parse(name, env, f"$GENAF_LIMIT_{name.upper()}")
    return LIMITS[name].default


def set_limit(name: str, value: int | str) -> None:
    """Override a limit for this process (what ``--limit NAME=VALUE`` calls)."""
    if name not in LIMITS:
        from .errors import unknown

        raise unknown("limit", name, LIMITS)
    _overrides[name] = _parse(name, value, f"--limit {name}")


def reset() -> None:
    """Drop every override (tests)."""
    _overrides.clear()


def _parse(name: str, value: int | str, where: str) -> int:
    try:
        v = int(float(value)) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise LimitError(f"{where}: '{value}' is not a whole number") from None
    if v <= 0:
        raise LimitError(f"{where}: a limit must be positive, got {v}")
    return v


def how_to_raise(name: str) -> str:
    return f"if you trust this file, raise the limit with --limit {name}=N or GENAF_LIMIT_{name.upper()}=N"


def check(name: str, value: float, what: str) -> None:
    """Raise :class:`LimitError` when ``value`` exceeds limit ``name``; ``what`` names the input."""
    lim = get(name)
    if value > lim:
        unit = LIMITS[name].unit
        raise LimitError(
            f"{what} claims {int(value):,} {unit}, more than the limit {name} = {lim:,} {unit} "
            f"({LIMITS[name].help}); {how_to_raise(name)}"
        )


def check_expansion(declared: float, on_disk: int, what: str) -> None:
    """Per-file rule: what ``what`` declares (or inflates to) stays within ``max_file_bytes`` and
    ``max_file_expansion`` × its size on disk (an uncompressed weight file declares about its own size)."""
    factor = get("max_file_expansion")
    if declared > factor * max(int(on_disk), 0):
        raise LimitError(
            f"{what} claims {int(declared):,} bytes from {int(on_disk):,} bytes on disk, more than the limit "
            f"max_file_expansion = {factor} × its size ({LIMITS['max_file_expansion'].help}); "
            f"{how_to_raise('max_file_expansion')}"
        )
    check("max_file_bytes", declared, what)
