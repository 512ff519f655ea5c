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
- harmless constructors of plain values (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``,
  ``int``, ``float``, ``complex``, ``str``, ``bool``, ``slice``, ``collections.OrderedDict``,
  ``defaultdict``, ``deque``; ``bytes``, ``bytearray`` and ``range`` through size-checked
  wrappers), and
- inert torch values: dtypes, layouts, memory formats, ``torch.Size`` and ``torch.device``.

The classes among these are immutable C types, and genaf's own helper objects refuse ``BUILD``,
so the pickle cannot patch them. Globals from modules that can run code (``os``/``posix``,
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

The tensors come back on the CPU regardless of the device they were saved from.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = [
    "InertGlobal",
    "extract_state_dict",
    "key_prefixes",
    "read_checkpoint",
    "tensor_dict",
]

# Legacy (torch < 1.6, non-zip) files start with a pickled magic number, e.g. protocol 2:
# PROTO 2, LONG1 10 bytes 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

# Largest element count accepted by the size-checked constructors (bytes(n), range(n), ...).
_MAX_CONSTRUCTED = 1 << 24


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Return the object stored in a ``torch.save`` file, executing no code from it.

    Tensors and plain containers come back as themselves; any other object is an inert
    :class:`InertGlobal` placeholder. Raises :class:`CheckpointError` for a missing, truncated,
    unreadable or booby-trapped file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file")
    first_error: BaseException | None = None
    # Globals another library registered with torch.serialization.add_safe_globals widen what
    # torch's weights-only loader will call; genaf does not rely on them.
    if not _foreign_safe_globals():
        try:
            return torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            first_error = exc
    return _restricted_load(p, first_error)


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

    def __new__(cls, *args: Any, **kwargs: Any) -> InertGlobal:
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


def _is_dangerous(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if module in ("builtins", "__builtin__"):
        return name not in _SAFE_BUILTIN_TYPES and name not in ("bytes", "bytearray", "range")
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


class _RawStorage:
    """One storage's bytes from the archive (native byte order on request), cached per dtype."""

    def __init__(self, data: torch.Tensor, swap: bool, key: str) -> None:
        self.data, self.swap, self.key = data, swap, key
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
    flat = ref.storage.as_dtype(dtype)
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor in storage {ref.storage.key} has an invalid layout")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.numel():
            raise CheckpointError(f"tensor in storage {ref.storage.key} reaches past the end of its data")
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


def _check_size(args: tuple) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_CONSTRUCTED:
            raise CheckpointError(f"the pickle asks to allocate {a} elements; refusing")


def _bytes(*args: Any) -> bytes:
    _check_size(args)
    return bytes(*args)


def _bytearray(*args: Any) -> bytearray:
    _check_size(args)
    return bytearray(*args)


def _range(*args: Any) -> range:
    r = range(*args)
    if len(r) > _MAX_CONSTRUCTED:
        raise CheckpointError(f"the pickle builds a range of {len(r)} numbers; refusing")
    return r


# Real classes handed out; all are immutable C types (the pickle cannot patch them).
_COLLECTIONS: dict[str, type] = {
    "OrderedDict": collections.OrderedDict,
    "defaultdict": collections.defaultdict,
    "deque": collections.deque,
}
_SAFE_TYPES = (*_SAFE_BUILTIN_TYPES.values(), *_COLLECTIONS.values(), torch.Size, torch.device)


def _newobj(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """``copyreg.__newobj__``: only for classes this reader handed out."""
    if isinstance(cls, type) and issubclass(cls, InertGlobal):
        return cls(*args, **kwargs)
    if any(cls is t for t in _SAFE_TYPES):
        return cls.__new__(cls, *args, **kwargs)
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
    ("builtins", "bytes"): _Allowed(_bytes),
    ("builtins", "bytearray"): _Allowed(_bytearray),
    ("builtins", "range"): _Allowed(_range),
    ("_codecs", "encode"): _Allowed(_codecs_encode),
    ("copyreg", "__newobj__"): _Allowed(_newobj),
    ("copyreg", "__newobj_ex__"): _Allowed(_newobj_ex),
    ("copyreg", "_reconstructor"): _Allowed(_reconstructor),
}


def _torch_value(name: str) -> Any:
    """torch dtypes/layouts/memory formats by name (inert values), else None."""
    if "." in name or name.startswith("_"):
        return None
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, zf: zipfile.ZipFile, prefix: str, path: Path, swap: bool) -> None:
        super().__init__(fh)
        self.zf, self.prefix, self.path, self.swap = zf, prefix, path, swap
        self.storages: dict[str, _RawStorage] = {}
        self.placeholders: dict[tuple[str, str], type[InertGlobal]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = _fix_py2_names(module, name)
        # Storage types first: torch < 2 wrote GPU tensors as torch.cuda.FloatStorage.
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if _is_dangerous(module, name):
            raise _refusal(self.path, f"{module}.{name}")
        if module == "torch._utils" and name in _REBUILDERS:
            return _REBUILDERS[name]
        if (module, name) in _SPECIAL:
            return _SPECIAL[(module, name)]
        if module == "torch":
            if name == "Size":
                return torch.Size
            if name == "device":
                return torch.device
            value = _torch_value(name)
            if value is not None:
                return value
        if module == "builtins":  # _is_dangerous let only the harmless constructors through
            return _SAFE_BUILTIN_TYPES[name]
        if module == "collections" and name in _COLLECTIONS:
            return _COLLECTIONS[name]
        if module == "copyreg":
            raise _refusal(self.path, f"{module}.{name}")
        key = (module, name)
        if key not in self.placeholders:
            self.placeholders[key] = _placeholder(module, name)
        return self.placeholders[key]

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
            self.storages[key] = self._read_storage(key, dtype, numel)
        return _StorageRef(self.storages[key], dtype)

    def _read_storage(self, key: str, dtype: torch.dtype | None, numel: Any) -> _RawStorage:
        entry = f"{self.prefix}/data/{key}"
        try:
            info = self.zf.getinfo(entry)
        except KeyError:
            raise CheckpointError(
                f"{self.path} is incomplete: tensor storage '{entry}' is missing from the archive"
            ) from None
        itemsize = 1 if dtype is None else torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize if isinstance(numel, int) and not isinstance(numel, bool) else None
        if nbytes is not None and info.file_size < nbytes:
            raise CheckpointError(f"{self.path}: storage '{entry}' has {info.file_size} bytes but should have {nbytes}")
        raw = self.zf.read(entry)
        if nbytes is not None:
            raw = raw[:nbytes]
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return _RawStorage(data, self.swap, key)


def _fix_py2_names(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles spell ``builtins`` as ``__builtin__`` (and so on); map them back."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _restricted_load(path: Path, first_error: BaseException | None) -> Any:
    torch_said = f" (torch.load said: {_first_line(first_error)})" if first_error is not None else ""
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
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            hint = " (it looks like a TorchScript archive)" if any(n.endswith("constants.pkl") for n in names) else ""
            raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint{hint}")
        prefix = pkl[0][: -len("/data.pkl")]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byte order '{byteorder}'")
        try:
            with zf.open(pkl[0]) as fh:
                unpickler = _RestrictedUnpickler(fh, zf, prefix, path, swap=byteorder != sys.byteorder)
                return unpickler.load()
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(exc)})") from exc
        except Exception as exc:  # malformed pickle: UnpicklingError, TypeError, ValueError, ...
            raise CheckpointError(f"{path} could not be read safely: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
