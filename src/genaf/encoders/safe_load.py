"""Read ``torch.save`` checkpoints without running any code from the file.

``read_checkpoint(path)`` first asks ``torch.load(..., weights_only=True)`` (unless another
library in this process has widened torch's allow-list with ``add_safe_globals``). Files that
hold more than tensors and plain containers (a Lightning checkpoint carries
``argparse.Namespace`` hyper-parameters, ``functools.partial`` schedulers, callback state, ...)
make that refuse; for those, genaf reads the zip archive itself with a restricted unpickler.

Why the restricted unpickler is safe
------------------------------------
Unpickling runs code only by *calling* something: a global named in the pickle (``REDUCE``,
``NEWOBJ``, ``INST``/``OBJ``), an object's ``__setstate__`` (``BUILD``) or its ``__setitem__`` /
``append``/``extend``. Every global goes through ``find_class``; ours never imports a module and
never returns a real callable except

- genaf's own tensor rebuilders (defined below; they only reinterpret bytes read from the
  archive as a tensor),
- constructors of plain values (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``int``,
  ``float``, ``complex``, ``str``, ``bool``, ``slice``, ``bytes``, ``bytearray``, ``range``,
  ``collections.OrderedDict``, ``defaultdict``, ``deque``, ``torch.Size``), each behind a wrapper
  that charges what it would copy or allocate to the file's memory budget before calling the real
  type (``str`` only converts numbers and text), and
- inert torch values: dtypes, layouts, memory formats and ``torch.device``.

These wrappers and genaf's other helper objects refuse ``BUILD``, so the pickle cannot patch them.
Globals from modules that can run code (``os``/``posix``,
``subprocess``, ``builtins.exec``/``eval``/``getattr``/``__import__``/``open``, ``importlib``,
``pickle``, ``operator``, ``types``, ``torch.load``, ``torch.hub``, ``numpy.load`` ...) raise
:class:`~genaf.errors.CheckpointError` naming the global, so a booby-trapped file is reported
rather than half-read. Every other global (``argparse.Namespace``, ``functools.partial``,
``omegaconf.*``, ``pathlib.*``, Lightning classes, numpy scalars, anything unknown) becomes an
*inert placeholder*: a class made here, per file, that records the arguments, state and items
it is given and does nothing else. Placeholder instances are not callable, and the function
inside, say, ``functools.partial(os.system, ...)`` is itself looked up through ``find_class``, so
it is refused. ``BUILD`` on a rebuilt tensor runs torch's ``Tensor.__setstate__``, which only
assigns ``data``/``requires_grad``/hooks from values of this same pickle (tensors, plain values
or placeholders); nothing else is ever reached.

Parts genaf does not use (LR-scheduler state, callbacks, hyper-parameters) often hold harmless
callables such as ``functools.partial(max, 0.0)``; ``builtins`` functions that cannot run code
(``max``, ``min``, ``abs``, ``sorted`` ...) become inert placeholders like any other unknown global,
and a warning names every global that was stubbed and where. Builtins that can run code or reach
objects (``eval``, ``exec``, ``compile``, ``__import__``, ``getattr``, ``open``, ``type`` ...) are
refused by name wherever they appear. The tensors of the state dict stay strictly checked:
:func:`tensor_dict` refuses a state dict entry that is a placeholder.

Bounded memory
--------------
What a file can make genaf allocate is checked against :mod:`genaf.limits` *before* allocating:
every zip record's declared (inflated) size, each storage against its record, each tensor's
materialised size (``numel × itemsize``, so a stride-0 view claiming thousands of channels counts
what it would cost), and every value the pickle constructs by a call (``bytearray(n)``,
``list(range(n))``, copies of containers). The total may not exceed ``max_file_expansion`` × the
size on disk (nor ``max_file_bytes``); one tensor may not exceed ``max_tensor_bytes``. Before torch's
own weights-only loader is used, genaf runs the same reader over the pickle without reading any
tensor data (a *scan*), so torch is only asked to load files whose every allocation was checked;
a file that makes torch call something the scan does not model is read by genaf's reader instead.

The tensors come back on the CPU regardless of the device they were saved from.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import limits
from ..errors import CheckpointError

__all__ = [
    "InertGlobal",
    "PlaceholderWarning",
    "check_safetensors",
    "check_torch_file",
    "extract_state_dict",
    "key_prefixes",
    "load_weights_only",
    "read_checkpoint",
    "tensor_dict",
]

# Legacy (torch < 1.6, non-zip) files start with a pickled magic number, e.g. protocol 2:
# PROTO 2, LONG1 10 bytes 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

# Bytes charged per element when the pickle calls a container constructor on an iterable
# (a pointer plus, for range(), a new int object; sets and dicts also grow a hash table).
_BYTES_PER_ITEM = 64


class PlaceholderWarning(UserWarning):
    """Parts of a checkpoint genaf does not use were read into inert placeholders."""


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Return the object stored in a ``torch.save`` file, executing no code from it.

    Tensors and plain containers come back as themselves; any other object is an inert
    :class:`InertGlobal` placeholder (with a :class:`PlaceholderWarning` naming them). Raises
    :class:`CheckpointError` for a missing, truncated, unreadable or booby-trapped file and
    :class:`~genaf.limits.LimitError` for one that claims more memory than it can honestly hold.
    """
    p = _existing(path)
    first_error: BaseException | None = None
    plain = check_torch_file(p) == []
    # Globals another library registered with torch.serialization.add_safe_globals widen what
    # torch's weights-only loader will call; genaf does not rely on them.
    if plain and not _foreign_safe_globals():
        try:
            return torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            first_error = exc
    return _restricted_load(p, first_error)


def load_weights_only(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` after checking what the file would allocate.

    For files genaf writes itself (encoder ``.pt`` files, training checkpoints): nothing but tensors
    and plain containers is accepted. Raises :class:`CheckpointError` (naming ``what``) or
    :class:`~genaf.limits.LimitError`.
    """
    p = _existing(path, what)
    called = check_torch_file(p)
    if called:
        raise CheckpointError(
            f"{what} {p} holds objects other than tensors and plain containers ({', '.join(called[:6])}); "
            "genaf reads this file with weights_only=True only"
        )
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {p} could not be read with weights_only=True ({_first_line(exc)})") from exc


def check_torch_file(path: str | os.PathLike) -> list[str] | None:
    """Check what a ``torch.save`` file would make a loader allocate, reading no tensor data.

    Raises :class:`~genaf.limits.LimitError` when the file claims more than the limits allow and
    :class:`CheckpointError` when it references code or is malformed. Returns the globals the
    pickle calls that this reader does not model (empty: every allocation torch's weights-only
    loader would make was checked), or None when the file is not a ``torch.save`` file.
    """
    p = Path(path)
    on_disk = p.stat().st_size
    try:
        zf = zipfile.ZipFile(p)
    except zipfile.BadZipFile:
        return _scan_legacy(p, on_disk)
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc}") from exc
    with zf:
        try:
            prefix, swap = _archive_layout(zf, p, on_disk)
        except CheckpointError:
            return None  # _restricted_load reports it
        budget = _Budget(p, on_disk)
        unpickler = _load_pickle(zf, prefix, p, swap, budget, read_data=False)
        return unpickler.called_placeholders()


# Element sizes of safetensors dtypes (bits for the sub-byte ones are rounded up per tensor).
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit


def check_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, str]:
    """Check a ``.safetensors`` file's header against its size and the limits before loading it.

    Every tensor's declared shape and dtype must match its byte range, the ranges must lie inside
    the file, one tensor may not exceed ``max_tensor_bytes`` and all of them ``max_file_bytes``.
    Returns the header's ``__metadata__`` (string to string). Raises :class:`CheckpointError` or
    :class:`~genaf.limits.LimitError`.
    """
    import json

    p = _existing(path, what)
    on_disk = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{what} {p} is not a readable safetensors file (only {len(head)} bytes)")
        n = int.from_bytes(head, "little")
        if n > on_disk - 8 or n > _MAX_SAFETENSORS_HEADER:
            raise CheckpointError(
                f"{what} {p} is not a readable safetensors file: its header claims {n:,} bytes "
                f"but the file has {on_disk:,}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{what} {p} is not a readable safetensors file (header: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} {p} is not a readable safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{what} {p} has a malformed __metadata__ (it must map strings to strings)")
    data_len, total = on_disk - 8 - n, 0
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        bits = _SAFETENSORS_BITS.get(info.get("dtype")) if isinstance(info, dict) else None
        ok = (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        )
        if not ok:
            raise CheckpointError(f"{what} {p}: tensor '{name}' has a malformed or out-of-file entry in the header")
        nbytes = -(-math.prod(shape) * bits // 8) if bits is not None else offsets[1] - offsets[0]
        limits.check("max_tensor_bytes", nbytes, f"tensor '{name}' (shape {shape}) in {p}")
        if nbytes != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{what} {p}: tensor '{name}' declares shape {shape} ({nbytes:,} bytes) but holds "
                f"{offsets[1] - offsets[0]:,} bytes"
            )
        total += nbytes
    limits.check_expansion(total, on_disk, f"{what} {p}")
    return meta


def _existing(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"{what} {p} is not a file")
    return p


def _foreign_safe_globals() -> list[str]:
    """Entries of torch's weights-only allow-list beyond torch's own (exceptions, torch classes)."""
    foreign = []
    for entry in torch.serialization.get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        module = getattr(obj, "__module__", None) or ""
        if module.split(".")[0] in ("torch", "traceback"):
            continue
        if module == "builtins" and isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        foreign.append(f"{module}.{getattr(obj, '__qualname__', obj)}")
    return foreign


def tensor_dict(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` mapping inside a loaded checkpoint.

    Unwraps ``{'state_dict': ...}``, ``{'model': ...}`` and ``{'model_state_dict': ...}`` and drops
    non-tensor entries. Raises :class:`CheckpointError` when no tensors are found.
    """
    inner = obj
    for _ in range(3):  # e.g. {'model': {'state_dict': {...}}}
        if not isinstance(inner, Mapping):
            break
        for key in ("state_dict", "model", "model_state_dict"):
            candidate = inner.get(key)
            if isinstance(candidate, Mapping) and not _is_tensor_map(inner):
                inner = candidate
                break
        else:
            break
    if not isinstance(inner, Mapping):
        kind = getattr(obj, "global_name", type(obj).__name__)
        raise CheckpointError(f"{what} holds a {kind}, not a state dict of tensors")
    stubbed = [
        str(k)
        for k, v in inner.items()
        if isinstance(v, InertGlobal) and (inner is not obj or type(v).global_name.startswith("torch."))
    ]
    if stubbed:
        kinds = sorted({type(inner[k]).global_name for k in inner if isinstance(inner[k], InertGlobal)})
        raise CheckpointError(
            f"{what}: state dict entries {_short(stubbed)} are not tensors but {', '.join(kinds)}, "
            "which genaf does not read"
        )
    tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        found = ", ".join(str(k) for k in list(inner)[:12]) or "nothing"
        raise CheckpointError(f"{what} contains no tensors (top-level keys: {found})")
    return tensors


def key_prefixes(keys: Iterable[str]) -> list[str]:
    """First components of dotted names, in order of appearance: ``['backbone.*', 'queue']``."""
    seen: dict[str, None] = {}
    for k in keys:
        head, dot, _ = k.partition(".")
        seen[f"{head}.*" if dot else head] = None
    return list(seen)


def extract_state_dict(
    state: Mapping[str, torch.Tensor], prefixes: Iterable[str], what: str
) -> tuple[str, dict[str, torch.Tensor]]:
    """The tensors under the first of ``prefixes`` present (e.g. ``'backbone.'``), prefix removed.

    Returns ``(prefix, sub_state)``. When none of the prefixes occurs, raises
    :class:`CheckpointError` listing the key prefixes the file does have.
    """
    prefixes = list(prefixes)
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return prefix, sub
    wanted = " or ".join(f"'{p}*'" for p in prefixes)
    found = ", ".join(key_prefixes(state)) or "no tensors"
    raise CheckpointError(f"{what} has no {wanted} keys; found: {found}")


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _is_tensor_map(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


# --------------------------------------------------------------------------------------------
# Inert placeholders
# --------------------------------------------------------------------------------------------


class InertGlobal:
    """Stand-in for a global genaf will not import. Records what it was built with; does nothing.

    ``global_name`` (class attribute) is ``'module.name'`` of the global it replaces;
    instances keep ``args``, ``kwargs``, ``state`` (``__setstate__``), ``setitems``
    (``__setitem__``) and ``appended`` (``append``/``extend``).
    """

    global_name = "?"
    instantiated = False  # set on a placeholder class once the pickle has called it

    def __new__(cls, *args: Any, **kwargs: Any) -> InertGlobal:
        if cls is not InertGlobal:
            type.__setattr__(cls, "instantiated", True)
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, setitems={}, appended=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the real __init__ is never run
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["setitems"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["appended"].append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__["appended"].extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


def _placeholder(module: str, name: str) -> type[InertGlobal]:
    ident = re.sub(r"\W", "_", name) or "Global"
    attrs = {
        "global_name": f"{module}.{name}",
        "__module__": __name__,
        "__qualname__": f"inert[{module}.{name}]",
    }
    return type(ident, (InertGlobal,), attrs)


# --------------------------------------------------------------------------------------------
# What find_class may return
# --------------------------------------------------------------------------------------------

# Whole modules (and everything under them) whose globals can run code, touch files, spawn
# processes, reach the network, or unpickle further data. A reference to any of them is refused.
_DANGEROUS_PREFIXES = frozenset(
    """
    os posix nt posixpath ntpath subprocess _posixsubprocess _winapi sys shutil importlib imp
    pkgutil zipimport runpy pickle _pickle cPickle pickletools shelve dbm marshal dill cloudpickle
    joblib code codeop ctypes _ctypes cffi socket _socket ssl select selectors asyncio http urllib
    urllib3 requests ftplib smtplib telnetlib xmlrpc pty tty termios fcntl resource mmap signal
    webbrowser types operator _operator functools.reduce multiprocessing threading _thread
    concurrent timeit pdb bdb trace profile cProfile inspect gc platform io _io tempfile glob
    fileinput linecache zipfile tarfile gzip bz2 lzma sqlite3 site sysconfig ensurepip venv
    distutils setuptools pip _imp _frozen_importlib _frozen_importlib_external
    torch.load torch.save torch.from_file torch.hub torch.serialization torch._weights_only_unpickler
    torch.jit torch.package torch.ops torch._ops torch._C torch.utils.cpp_extension torch.utils.data
    torch.distributed torch.multiprocessing torch.cuda torch.compile torch._dynamo torch._inductor
    numpy.load numpy.loads numpy.save numpy.savez numpy.savez_compressed numpy.savetxt numpy.loadtxt
    numpy.genfromtxt numpy.fromfile numpy.memmap numpy.lib.npyio numpy.lib._npyio_impl numpy.lib.format
    numpy.ctypeslib numpy.f2py numpy.distutils numpy.testing pandas.read_pickle
    """.split()
)

_SAFE_BUILTIN_TYPES: dict[str, Any] = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "int": int,
    "float": float,
    "complex": complex,
    "str": str,
    "bool": bool,
    "slice": slice,
}

_STORAGE_DTYPES: dict[str, torch.dtype | None] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": None,  # raw bytes; _rebuild_tensor_v3 supplies the dtype
}


def _refusal(path: Path, full_name: str) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: it references {full_name}, which could run code; "
        "genaf never unpickles code (if you trust the file, re-save just its tensors with "
        "torch.save(state_dict, path))"
    )


# Builtins that run code, reach attributes, files or the interpreter: refused wherever they appear.
# Every other builtin (max, min, abs, sorted, object, exception classes ...) cannot run code by
# being named, and becomes an inert placeholder that is never called.
_REFUSED_BUILTINS = frozenset(
    """
    eval exec compile __import__ open getattr setattr delattr hasattr globals locals vars dir input
    breakpoint exit quit help type memoryview classmethod staticmethod property super
    copyright credits license
    """.split()
)


def _is_dangerous(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if module in ("builtins", "__builtin__"):
        return name in _REFUSED_BUILTINS or name.startswith("_") or "." in name
    parts = full.split(".")
    return any(".".join(parts[:i]) in _DANGEROUS_PREFIXES for i in range(1, len(parts) + 1))


class _Frozen:
    """Base of the helper objects handed to the pickle: a ``BUILD`` opcode on them is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError("the pickle tries to modify one of genaf's loader objects; refusing")


class _StorageType(_Frozen):
    """What ``torch.FloatStorage`` & co. resolve to: a marker carrying the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype | None) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _Budget:
    """What one file may make genaf allocate (see "Bounded memory" above); charged before allocating."""

    def __init__(self, path: Path, on_disk: int) -> None:
        self.path, self.on_disk, self.used = path, on_disk, 0

    def charge(self, nbytes: int, what: str) -> None:
        self.used += max(int(nbytes), 0)
        limits.check_expansion(self.used, self.on_disk, f"{self.path} ({what})")

    def tensor(self, nbytes: int, what: str) -> None:
        limits.check("max_tensor_bytes", nbytes, f"{what} in {self.path}")
        self.charge(nbytes, what)


class _RawStorage:
    """One storage's bytes from the archive (native byte order on request), cached per dtype.

    In a scan, ``data`` is a meta tensor of the storage's size: nothing is read or allocated.
    """

    def __init__(self, data: torch.Tensor, swap: bool, key: str, budget: _Budget) -> None:
        self.data, self.swap, self.key, self.budget = data, swap, key, budget
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def as_dtype(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._views:
            raw = self.data
            size = torch.empty((), dtype=dtype).element_size()
            if raw.numel() % size:
                raise CheckpointError(
                    f"storage {self.key} has {raw.numel()} bytes, not a whole number of {dtype} elements"
                )
            if self.swap and size > 1:
                self.budget.charge(raw.numel(), f"a byte-swapped copy of storage {self.key}")
                part = size // 2 if dtype.is_complex else size  # real and imaginary swap separately
                raw = raw.view(-1, part).flip(1).reshape(-1)
            self._views[dtype] = raw.view(dtype)
        return self._views[dtype]


class _StorageRef(_Frozen):
    """What a persistent id resolves to: a storage and the dtype it was saved as (None: untyped)."""

    __slots__ = ("storage", "dtype")

    def __init__(self, storage: _RawStorage, dtype: torch.dtype | None) -> None:
        self.storage, self.dtype = storage, dtype


class _Allowed(_Frozen):
    """A callable genaf hands to the pickle (its own rebuilders and checked constructors)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<genaf safe {getattr(self.fn, '__name__', self.fn)}>"


# --- genaf's own rebuilders (what torch._utils._rebuild_* resolve to) -------------------------


def _as_tensor(ref: Any, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(ref, _StorageRef):
        raise CheckpointError(f"tensor data is a {type(ref).__name__}, not a storage from the archive")
    storage = ref.storage
    flat = storage.as_dtype(dtype)
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor in storage {storage.key} has an invalid layout")
    # What the tensor costs once materialised (a stride-0 view claims numel elements from few bytes).
    nbytes = math.prod(size) * flat.element_size()
    storage.budget.tensor(nbytes, f"a {dtype} tensor of shape {list(size)} (storage {storage.key})")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.numel():
            raise CheckpointError(f"tensor in storage {storage.key} reaches past the end of its data")
    return flat.as_strided(size, stride, offset)


def _apply_metadata(t: torch.Tensor, metadata: Any) -> torch.Tensor:
    """torch records lazy negation/conjugation views as metadata; materialise them."""
    if not metadata:
        return t
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"unexpected tensor metadata {type(metadata).__name__}")
    if metadata.get("neg"):
        t = -t
    if metadata.get("conj") and t.is_complex():
        t = t.conj().resolve_conj()
    return t


def _rebuild_tensor(ref: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(ref, _StorageRef) or ref.dtype is None:
        raise CheckpointError("tensor data has no element type")
    return _as_tensor(ref, ref.dtype, storage_offset, size, stride)


def _rebuild_tensor_v2(
    ref: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    return _apply_metadata(_rebuild_tensor(ref, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(
    ref: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"tensor dtype is a {type(dtype).__name__}, not a torch dtype")
    return _apply_metadata(_as_tensor(ref, dtype, storage_offset, size, stride), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any = None, state: Any = None) -> Any:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter data is a {type(data).__name__}, not a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad) and data.is_floating_point())


_REBUILDERS: dict[str, _Allowed] = {
    "_rebuild_tensor": _Allowed(_rebuild_tensor),
    "_rebuild_tensor_v2": _Allowed(_rebuild_tensor_v2),
    "_rebuild_tensor_v3": _Allowed(_rebuild_tensor_v3),
    "_rebuild_parameter": _Allowed(_rebuild_parameter),
    "_rebuild_parameter_with_state": _Allowed(_rebuild_parameter),
}


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensors saved with Python attributes: rebuild the plain tensor, ignore type and state."""
    if not any(func is f for f in _REBUILDERS.values()):
        raise CheckpointError("a tensor in the file is rebuilt by something other than torch's rebuilders")
    return func(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """How protocol-2 pickles spell ``bytes``: ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointError(f"unsupported _codecs.encode({type(text).__name__}, {encoding!r}) in the pickle")
    return text.encode("latin1")


# --- constructors the pickle may call, each charged to the file's budget first ---------------

_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset, range, collections.deque)


def _items(args: Iterable[Any]) -> int:
    """Elements a constructor would copy out of its (already built) arguments."""
    return sum(len(a) for a in args if isinstance(a, _SIZED))


def _byte_count(args: tuple) -> int:
    """Bytes ``bytes(*args)``/``bytearray(*args)`` would allocate (``bytes(n)`` is n zero bytes)."""
    if len(args) == 1 and isinstance(args[0], int) and not isinstance(args[0], bool):
        return abs(args[0])
    return _items(args[:1])


def _constructors(budget: _Budget) -> dict[tuple[str, str], _Allowed]:
    """The constructors handed to one file's pickle, charging ``budget`` before they allocate."""

    def sized(kind: str, make: Any) -> _Allowed:
        def build(*args: Any, **kwargs: Any) -> Any:
            n = _items(args) + len(kwargs)
            budget.charge(n * _BYTES_PER_ITEM, f"a {kind} of {n:,} elements built by the pickle")
            return make(*args, **kwargs)

        build.__name__ = kind
        return _Allowed(build)

    def raw_bytes(kind: str, make: type) -> _Allowed:
        def build(*args: Any) -> Any:
            n = _byte_count(args)
            budget.charge(n, f"{kind}({n:,}) built by the pickle")
            return make(*args)

        build.__name__ = kind
        return _Allowed(build)

    def text(*args: Any) -> str:
        if len(args) > 1 or (args and not isinstance(args[0], (str, int, float, bool, type(None)))):
            kind = type(args[0]).__name__ if args else "?"
            raise CheckpointError(f"the pickle converts a {kind} to text; genaf's reader does not")
        return str(*args)

    def scalar(kind: str, make: type) -> _Allowed:
        def build(*args: Any) -> Any:
            if any(not isinstance(a, (str, bytes, int, float, bool, complex)) for a in args):
                raise CheckpointError(f"the pickle calls {kind}() on a {type(args[0]).__name__}; not supported")
            return make(*args)

        build.__name__ = kind
        return _Allowed(build)

    def make_range(*args: Any) -> range:
        return range(*args)  # lazy: what consumes it is charged per element

    out: dict[tuple[str, str], _Allowed] = {
        ("builtins", "bytes"): raw_bytes("bytes", bytes),
        ("builtins", "bytearray"): raw_bytes("bytearray", bytearray),
        ("builtins", "range"): _Allowed(make_range),
        ("builtins", "str"): _Allowed(text),
        ("builtins", "slice"): _Allowed(slice),
        ("torch", "Size"): sized("torch.Size", torch.Size),
        ("torch", "device"): _Allowed(torch.device),
    }
    for name in ("list", "tuple", "set", "frozenset", "dict"):
        out[("builtins", name)] = sized(name, _SAFE_BUILTIN_TYPES[name])
    for name in ("int", "float", "complex", "bool"):
        out[("builtins", name)] = scalar(name, _SAFE_BUILTIN_TYPES[name])
    for name, cls in _COLLECTIONS.items():
        out[("collections", name)] = sized(name, cls)
    return out


_COLLECTIONS: dict[str, type] = {
    "OrderedDict": collections.OrderedDict,
    "defaultdict": collections.defaultdict,
    "deque": collections.deque,
}


def _newobj(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """``copyreg.__newobj__``: only for placeholder classes this reader made."""
    if isinstance(cls, type) and issubclass(cls, InertGlobal):
        return cls(*args, **kwargs)
    raise CheckpointError(f"copyreg.__newobj__ on {cls!r} is not allowed")


def _newobj_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    return _newobj(cls, *tuple(args), **dict(kwargs))


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects): only placeholders are built."""
    if isinstance(cls, type) and issubclass(cls, InertGlobal):
        return cls() if state is None else cls(state)
    raise CheckpointError(f"copyreg._reconstructor on {cls!r} is not allowed")


_SPECIAL: dict[tuple[str, str], _Allowed] = {
    ("torch._tensor", "_rebuild_from_type_v2"): _Allowed(_rebuild_from_type_v2),
    ("_codecs", "encode"): _Allowed(_codecs_encode),
    ("copyreg", "__newobj__"): _Allowed(_newobj),
    ("copyreg", "__newobj_ex__"): _Allowed(_newobj_ex),
    ("copyreg", "_reconstructor"): _Allowed(_reconstructor),
}

# Globals torch's weights-only loader resolves that genaf's reader stubs: referencing them is
# harmless (the layout helper of sparse tensors lives in torch.serialization, refused otherwise).
_TORCH_STUBBED = frozenset({("torch.serialization", "_get_layout")})


def _torch_value(name: str) -> Any:
    """torch dtypes/layouts/memory formats by name (inert values), else None."""
    if "." in name or name.startswith("_"):
        return None
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """genaf's reader over one pickle. ``read_data=False`` (a scan) reads no tensor data: storages
    are meta tensors of their declared size, so only what the file claims is checked."""

    def __init__(
        self,
        fh: Any,
        path: Path,
        budget: _Budget,
        storage: Any,
    ) -> None:
        super().__init__(fh)
        self.path, self.budget, self.storage = path, budget, storage
        self.storages: dict[str, _RawStorage] = {}
        self.placeholders: dict[tuple[str, str], type[InertGlobal]] = {}
        self.constructors = _constructors(budget)

    def find_class(self, module: str, name: str) -> Any:
        module, name = _fix_py2_names(module, name)
        # Storage types first: torch < 2 wrote GPU tensors as torch.cuda.FloatStorage.
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) not in _TORCH_STUBBED and _is_dangerous(module, name):
            raise _refusal(self.path, f"{module}.{name}")
        if module == "torch._utils" and name in _REBUILDERS:
            return _REBUILDERS[name]
        if (module, name) in _SPECIAL:
            return _SPECIAL[(module, name)]
        if (module, name) in self.constructors:
            return self.constructors[(module, name)]
        if module == "torch":
            value = _torch_value(name)
            if value is not None:
                return value
        if module == "copyreg":
            raise _refusal(self.path, f"{module}.{name}")
        key = (module, name)
        if key not in self.placeholders:
            self.placeholders[key] = _placeholder(module, name)
        return self.placeholders[key]

    def called_placeholders(self) -> list[str]:
        """Placeholders the pickle called (torch's loader would have called the real global)."""
        return sorted(c.global_name for c in self.placeholders.values() if c.instantiated)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 4 or pid[0] != "storage":
            kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise CheckpointError(f"{self.path} refers to a '{kind}' record; only tensor storages are supported")
        storage_type, key = pid[1], pid[2]
        numel = pid[4] if len(pid) > 4 else None
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise CheckpointError(f"{self.path}: unknown storage type {storage_type!r}")
        if not isinstance(key, str) or not re.fullmatch(r"[\w.-]+", key):
            raise CheckpointError(f"{self.path}: malformed storage key {key!r}")
        if key not in self.storages:
            itemsize = 1 if dtype is None else torch.empty((), dtype=dtype).element_size()
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                numel = None
            nbytes = None if numel is None else numel * itemsize
            data = self.storage(key, nbytes)
            self.storages[key] = _RawStorage(data, getattr(self, "swap", False), key, self.budget)
        return _StorageRef(self.storages[key], dtype)


def _load_pickle(
    zf: zipfile.ZipFile, prefix: str, path: Path, swap: bool, budget: _Budget, read_data: bool
) -> _RestrictedUnpickler:
    """Run genaf's reader over ``prefix/data.pkl``; the result is in ``.result``."""

    def storage(key: str, nbytes: int | None) -> torch.Tensor:
        entry = f"{prefix}/data/{key}"
        try:
            info = zf.getinfo(entry)
        except KeyError:
            raise CheckpointError(
                f"{path} is incomplete: tensor storage '{entry}' is missing from the archive"
            ) from None
        if nbytes is not None:
            what = f"storage '{entry}' ({nbytes:,} bytes declared)"
            limits.check("max_tensor_bytes", nbytes, f"{path}: {what}")
            limits.check_expansion(nbytes, budget.on_disk, f"{path}: {what}")
            if info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage '{entry}' has {info.file_size} bytes but should have {nbytes}")
        size = info.file_size if nbytes is None else nbytes
        if not read_data:
            return torch.empty(size, dtype=torch.uint8, device="meta")
        return _read_record(zf, entry, size, path)

    pkl = f"{prefix}/data.pkl"
    try:
        # The pickle itself is read into memory (its declared size was checked with the archive),
        # so a counted string cannot make the C unpickler allocate more than the record holds.
        with zf.open(pkl) as fh:
            data = fh.read()
        _check_counted_lengths(data, path)
        unpickler = _RestrictedUnpickler(io.BytesIO(data), path, budget, storage)
        unpickler.swap = swap
        unpickler.result = unpickler.load()
        return unpickler
    except (CheckpointError, limits.LimitError):
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(exc)})") from exc
    except Exception as exc:  # malformed pickle: UnpicklingError, TypeError, ValueError, ...
        raise CheckpointError(f"{path} could not be read safely: {type(exc).__name__}: {_first_line(exc)}") from exc


def _read_record(zf: zipfile.ZipFile, entry: str, size: int, path: Path) -> torch.Tensor:
    """The first ``size`` bytes of a zip record, read once into one buffer (no second copy)."""
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    with zf.open(entry) as fh:
        while pos < size:
            chunk = fh.read(min(1 << 22, size - pos))
            if not chunk:
                break
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
    if pos < size:
        raise CheckpointError(f"{path} is corrupt or truncated (storage '{entry}' ends after {pos} of {size} bytes)")
    return torch.frombuffer(buf, dtype=torch.uint8)


def _check_counted_lengths(data: bytes, path: Path) -> None:
    """Walk the pickle's opcodes without building anything: a string, bytes or frame whose declared
    length runs past the end is refused before the C unpickler allocates that length."""
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError as exc:  # "expected N bytes in a bytes8, but only M remain", bad opcode, ...
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(exc)})") from exc


def _archive_layout(zf: zipfile.ZipFile, path: Path, on_disk: int) -> tuple[str, bool]:
    """Check the archive's declared sizes against the limits; return (record prefix, byte swap)."""
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        hint = " (it looks like a TorchScript archive)" if any(n.endswith("constants.pkl") for n in names) else ""
        raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint{hint}")
    total = 0
    for info in zf.infolist():
        limits.check("max_tensor_bytes", info.file_size, f"record '{info.filename}' of {path}")
        total += info.file_size
    limits.check_expansion(total, on_disk, f"{path} (its zip records, once inflated)")
    prefix = pkl[0][: -len("/data.pkl")]
    byteorder = "little"
    if f"{prefix}/byteorder" in names:
        byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byte order '{byteorder}'")
    return prefix, byteorder != sys.byteorder


class _BoundedFile:
    """A file whose ``read(n)`` allocates at most what is left of it (buffered readers allocate
    ``n`` first, and a pickle's declared string length is ``n``)."""

    def __init__(self, fh: Any, size: int) -> None:
        self.fh, self.size = fh, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.fh.tell())
        return self.fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.fh.readline()

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, pos: int) -> int:
        return self.fh.seek(pos)


def _scan_legacy(path: Path, on_disk: int) -> list[str] | None:
    """torch's pre-1.6 format: five pickles, then raw storages. Declared storage sizes must fit in
    the file; returns the unmodelled globals called (None for a file that is not a torch file)."""
    with open(path, "rb") as raw:
        head = raw.read(32)
        if not (len(head) >= 2 + len(_LEGACY_MAGIC) and head[0] == 0x80 and head[2:].startswith(_LEGACY_MAGIC)):
            return None
        raw.seek(0)
        fh = _BoundedFile(raw, on_disk)
        budget = _Budget(path, on_disk)
        declared = 0

        def storage(key: str, nbytes: int | None) -> torch.Tensor:
            nonlocal declared
            if nbytes is None:
                raise CheckpointError(f"{path}: a legacy storage without a size")
            declared += nbytes
            limits.check("max_tensor_bytes", nbytes, f"{path}: a legacy storage of {nbytes:,} bytes")
            limits.check_expansion(declared, on_disk, f"{path} (its legacy storages)")
            if declared > on_disk:
                raise CheckpointError(
                    f"{path} declares {declared:,} bytes of tensor data but is only {on_disk:,} bytes long "
                    "(corrupt or forged)"
                )
            return torch.empty(nbytes, dtype=torch.uint8, device="meta")

        called: set[str] = set()
        try:
            for _ in range(5):  # magic number, protocol, sys info, the object, the storage keys
                start = fh.tell()
                for _op in pickletools.genops(fh):
                    pass
                end = fh.tell()
                fh.seek(start)
                unpickler = _RestrictedUnpickler(io.BytesIO(fh.read(end - start)), path, budget, storage)
                unpickler.load()
                called.update(unpickler.called_placeholders())
        except (CheckpointError, limits.LimitError):
            raise
        except Exception as exc:
            raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(exc)})") from exc
        return sorted(called)


def _fix_py2_names(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles spell ``builtins`` as ``__builtin__`` (and so on); map them back."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _restricted_load(path: Path, first_error: BaseException | None) -> Any:
    torch_said = f" (torch.load said: {_first_line(first_error)})" if first_error is not None else ""
    on_disk = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        zf = None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if zf is None:
        with open(path, "rb") as fh:
            head = fh.read(32)
        if len(head) >= 2 + len(_LEGACY_MAGIC) and head[0] == 0x80 and head[2:].startswith(_LEGACY_MAGIC):
            raise CheckpointError(
                f"{path} is in torch's legacy (pre-1.6, non-zip) format and holds objects other than "
                "tensors and plain containers, which genaf's safe reader cannot read; re-save it with a "
                "recent torch (torch.save(obj, path)), ideally saving just the state dict"
            )
        raise CheckpointError(
            f"{path} is not a torch checkpoint: it is not a torch.save zip archive "
            f"(truncated or corrupt download?){torch_said}"
        )
    with zf:
        prefix, swap = _archive_layout(zf, path, on_disk)
        unpickler = _load_pickle(zf, prefix, path, swap, _Budget(path, on_disk), read_data=True)
    result = unpickler.result
    stubbed = sorted(c.global_name for c in unpickler.placeholders.values())
    if stubbed:
        where = _placeholder_locations(result)
        warnings.warn(
            f"{path}: parts genaf does not use were read as inert placeholders, never called: "
            f"{', '.join(stubbed)}" + (f" (under {', '.join(where)})" if where else ""),
            PlaceholderWarning,
            stacklevel=3,
        )
    return result


def _placeholder_locations(obj: Any, limit: int = 100_000) -> list[str]:
    """Top-level keys (or indices) under which placeholders sit, found by a bounded walk."""
    if not isinstance(obj, (Mapping, list, tuple)):
        return ["the file's top-level object"] if isinstance(obj, InertGlobal) else []
    found: list[str] = []
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
    budget = [limit]
    for key, value in items:
        if _holds_placeholder(value, budget, depth=0):
            found.append(str(key))
    return found


def _holds_placeholder(obj: Any, budget: list[int], depth: int) -> bool:
    budget[0] -= 1
    if budget[0] < 0 or depth > 50:
        return False
    if isinstance(obj, InertGlobal):
        return True
    if isinstance(obj, Mapping):
        children: Iterable[Any] = (*obj.keys(), *obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        children = obj
    else:
        return False
    return any(_holds_placeholder(c, budget, depth + 1) for c in children)


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
