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


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``start, stop`` of ``n`` that process ``rank`` of ``world`` holds: contiguous blocks in
    rank order, their sizes differing by at most one (equal when ``world`` divides ``n``)."""
    return rank * n // world, (rank + 1) * n // world


class RowGenerator(torch.Generator):
    """A CPU generator that stands for one process's rows of a batch spread over several processes.

    ``rows = (start, stop, total)``: this process holds rows ``start:stop`` of a batch of ``total``
    rows. :func:`draw` then draws for all ``total`` rows, exactly as one process holding the whole
    batch would, and keeps this process's rows, so the random starts and augmentations of a
    data-parallel run equal a single process's (``genaf.distributed``). ``rows = None``: a plain
    generator."""

    rows: tuple[int, int, int] | None = None


def row_generator(global_seed: int, key: str, rows: tuple[int, int, int] | None = None) -> RowGenerator:
    """A :class:`RowGenerator` seeded as :func:`generator` seeds one."""
    g = RowGenerator()
    g.manual_seed(unit_seed(global_seed, key))
    g.rows = rows
    return g


def draw(fn: Callable, shape, gen: torch.Generator | None, **kwargs) -> torch.Tensor:
    """``fn(shape, generator=gen, **kwargs)`` (``torch.rand``, ``torch.randn``, or a
    ``functools.partial`` of ``torch.randint``) on the CPU; for a :class:`RowGenerator` with rows
    set, the draw of the whole batch, of which this process's rows are kept."""
    shape = tuple(shape)
    rows = getattr(gen, "rows", None)
    if rows is None:
        return fn(shape, generator=gen, device="cpu", **kwargs)
    start, stop, total = rows
    if shape[0] != stop - start:
        raise ValueError(f"a draw for {shape[0]} rows from a generator of rows {start}:{stop} of {total}")
    return fn((total, *shape[1:]), generator=gen, device="cpu", **kwargs)[start:stop]


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
        # mkstemp creates the file 0600; a result file gets the mode any new file of the user gets
        os.chmod(tmp, 0o666 & ~current_umask())
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


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


PERTURBATION_SUFFIX = ".safetensors"


def perturbation_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The file name a perturbation is written to, and a note when it differs from ``path``.

    Perturbations are safetensors files (tensors + a JSON header, never a pickle), so their name
    ends in ``.safetensors``: a name ending in a pickle/torch suffix (``.pt``, ``.pth``,
    ``.ckpt``, ``.bin``, ``.pkl``) has the suffix replaced, any other name gets
    ``.safetensors`` appended (``ssp`` -> ``ssp.safetensors``, ``ssp.v2`` ->
    ``ssp.v2.safetensors``). Read them with ``Perturbation.load`` (the metadata too) or
    ``safetensors.torch.load_file`` (the tensors).
    """
    p = Path(path)
    if p.suffix == PERTURBATION_SUFFIX:
        return p, None
    if p.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar"):
        new = p.with_suffix(PERTURBATION_SUFFIX)
    else:
        new = p.with_name(p.name + PERTURBATION_SUFFIX)
    return new, (
        f"writing {new} instead of {p}: a perturbation is a safetensors file, not a torch pickle "
        "(read it with genaf.attacks.perturbation.Perturbation.load or safetensors.torch.load_file)"
    )


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
    """Library versions recorded in every run directory (torchvision's from its installed
    metadata: importing it costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        tv = version("torchvision")
    except PackageNotFoundError:
        tv = "not installed"
    return {
        "genaf": __version__,
        "torch": torch.__version__,
        "torchvision": tv,
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


# --- progress --------------------------------------------------------------------------------
#
# One mechanism for every long step (crafting, the auto choice of a layer or patch place,
# evaluation, white-box checks, stage-2 scoring, pretraining, training epochs, bench cells):
#
# - on a terminal (stderr is a TTY): a tqdm bar on stderr;
# - otherwise (a log file, a pipe): one plain line per unit of work through the step's ``log``
#   callable (a fine-grained loop, such as the iterations of a crafting run, reports at most
#   ``lines`` evenly spaced lines);
# - nothing when progress is switched off (``set_quiet(True)``, ``genaf ... --quiet``) or, off a
#   terminal, when the step has no ``log``.

_QUIET = False


def set_quiet(quiet: bool) -> bool:
    """Switch progress reports off (True) or on; returns the previous setting."""
    global _QUIET
    old, _QUIET = _QUIET, bool(quiet)
    return old


def is_quiet() -> bool:
    return _QUIET


def _fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """Progress of ``total`` units of work named ``desc`` (see the comment above).

    ``update(n, info)`` marks ``n`` more units done; ``info`` (e.g. ``"robust acc 43.1 %"``)
    is shown with the unit. Plain lines read
    ``desc: 3/10 unit (30 %), 12 s, ETA 28 s; info``; the ETA is the mean time per unit so far
    times the units left. Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "step",
        log: Callable[[str], Any] | None = None,
        lines: int | None = None,
        enabled: bool = True,
        terminal: bool | None = None,
    ):
        import sys
        import time

        self.total, self.desc, self.unit, self.log = max(int(total), 0), desc, unit, log
        self.n, self.t0, self._time = 0, time.time(), time.time
        self.lines = lines
        self._last_line = -1
        self.bar = None
        self.mode = "off"
        if not enabled or _QUIET or self.total == 0:
            return
        tty = sys.stderr.isatty() if terminal is None else terminal
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
            self.mode = "bar"
        elif log is not None:
            self.mode = "lines"

    def eta(self) -> float | None:
        """Seconds left, from the mean time per unit so far (None before the first unit)."""
        if self.n <= 0:
            return None
        return (self._time() - self.t0) / self.n * max(self.total - self.n, 0)

    def line(self, info: str = "") -> str:
        elapsed = self._time() - self.t0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f} %), {_fmt_seconds(elapsed)}"
        if self.n < self.total:
            text += f", ETA {_fmt_seconds(self.eta() or 0.0)}"
        return f"{text}; {info}" if info else text

    def update(self, n: int = 1, info: str = "") -> None:
        self.n = min(self.n + int(n), self.total)
        if self.mode == "bar":
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines":
            if self.lines:
                slot = self.n * self.lines // self.total if self.total else self.lines
                if slot == self._last_line or (slot == 0 and self.n < self.total):
                    return
                self._last_line = slot
            self.log(self.line(info))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "step", log=None, lines: int | None = None, **kw) -> Progress:
    """A :class:`Progress` (tqdm on a terminal, plain lines through ``log`` elsewhere)."""
    return Progress(total, desc, unit=unit, log=log, lines=lines, **kw)


def track(items, desc: str, unit: str = "step", log=None, info=None, **kw):
    """Iterate over ``items`` reporting one unit of progress after each; ``info(item)`` (optional)
    describes the finished item."""
    items = list(items)
    with Progress(len(items), desc, unit=unit, log=log, **kw) as bar:
        for item in items:
            yield item
            bar.update(1, info(item) if info else "")


def pct(v: float | None) -> str:
    """An accuracy (a fraction) as a percentage for logs: 0.4312 -> '43.1 %'."""
    return "n/a" if v is None else f"{100 * float(v):.1f} %"


_UNCOUNTED = [0]


@contextlib.contextmanager
def uncounted():
    """Forward passes that are bookkeeping of an implementation, not a method's work (the prefix
    cache of stage-2 scoring records and checks the blocks' outputs): ``genaf.train.PassCounter``
    does not count them, so a method's training budget is the same with or without such a cache,
    and on one process or several."""
    _UNCOUNTED[0] += 1
    try:
        yield
    finally:
        _UNCOUNTED[0] -= 1


def counting_paused() -> bool:
    return _UNCOUNTED[0] > 0
