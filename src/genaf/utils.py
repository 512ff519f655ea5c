"""Small shared helpers: seeding per unit of work, devices, atomic writes, versions."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError


def unit_seed(global_seed: int, key: str) -> int:
    """A 63-bit seed derived from (global seed, unit key).

    Every unit of work (a layer's sensitivity score, an attack fit, an experiment cell) seeds
    its RNG from this, so the same unit gives the same result wherever and in whatever order it
    runs.
    """
    digest = hashlib.sha256(f"{int(global_seed)}::{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(global_seed: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from (global seed, unit key)."""
    g = torch.Generator(device=device)
    g.manual_seed(unit_seed(global_seed, key))
    return g


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """Deterministic kernels for the duration (``train: {deterministic: true}``, ``--deterministic``).

    On: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic with
    its autotuner off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's deterministic workspace;
    it must be set before CUDA starts, so the CLI sets it at start-up too). An op that has no
    deterministic implementation still runs, and torch's warning about it is collected: the
    yielded dict's ``nondeterministic_ops`` lists them (recorded in ``metrics.json`` as
    ``determinism``), so a run that could not be made reproducible says why. Off: nothing changes.
    The previous settings are restored on exit."""
    import warnings

    info: dict = {"deterministic": bool(on), "nondeterministic_ops": []}
    if not on:
        yield info
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    info["cublas_workspace_config"] = os.environ["CUBLAS_WORKSPACE_CONFIG"]
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield info
        for w in caught:
            text = str(w.message)
            if "deterministic" in text and text not in info["nondeterministic_ops"]:
                info["nondeterministic_ops"].append(text.splitlines()[0])
            elif "deterministic" not in text:  # hand the others on as they came
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda") and device != "mps":
        raise ConfigError(f"unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Write a file atomically: `writer(tmp_path)` then fsync and rename over `path`.

    A crash (or a full disk) while writing leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        kept = "the previous version is intact" if path.exists() else "nothing was written"
        from .errors import GenafError

        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise GenafError(
                f"no space left on the device while writing {path} ({kept}); free some space and run "
                "the command again (finetune: with --resume)"
            ) from exc
        if isinstance(exc, RuntimeError) and _is_write_failure(exc):
            # torch's file writer reports a full disk as a RuntimeError, not as OSError(ENOSPC)
            free = _free_bytes(path.parent)
            raise GenafError(
                f"writing {path} failed ({_first_line(exc)}); is the disk full? ({free} free; {kept}); free some "
                "space and run the command again (finetune: with --resume)"
            ) from exc
        raise


def _is_write_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(k in text for k in ("inline_container", "file write failed", "failed writing", "unexpected pos"))


def _free_bytes(folder: Path) -> str:
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return ""


def _first_line(exc: BaseException) -> str:
    from .errors import first_line

    return first_line(exc)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""

    def _w(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")

    atomic_write(path, _w)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def versions() -> dict[str, str]:
    """Library versions recorded in every run directory."""
    import torchvision

    from . import __version__

    return {
        "genaf": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A short, order-independent content hash of a dict of tensors."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_eps(eps: float, name: str = "eps") -> float:
    """An L-inf budget in [0,1] pixel units must lie in (0, 1]."""
    try:
        eps = float(eps)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number in (0, 1] (pixel units), got {eps!r}") from exc
    if not (0.0 < eps <= 1.0) or eps != eps:
        raise ConfigError(f"{name}={eps} is outside (0, 1]; budgets are in [0,1] pixel units (write 8/255 as 0.0314)")
    return eps


def parse_fraction(value: str | float) -> float:
    """Parse '8/255' or '0.03' into a float."""
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"cannot read '{value}' as a number (use e.g. 8/255 or 0.0314)") from exc
