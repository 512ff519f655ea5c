"""The safe checkpoint reader: tensors come back, code never runs, bad files give clear errors."""

from __future__ import annotations

import argparse
import builtins
import collections
import functools
import importlib
import json
import marshal
import operator
import os
import pickle
import runpy
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from enc_helpers import rewrite_zip, zip_prefix

from genaf.encoders import load_encoder
from genaf.encoders.safe_load import (
    InertGlobal,
    PlaceholderWarning,
    extract_state_dict,
    key_prefixes,
    read_checkpoint,
    tensor_dict,
)
from genaf.errors import CheckpointError
from genaf.limits import LimitError


class Payload:
    """Unpickles as ``func(*args)``: the classic way a pickle runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _qualified(func) -> str:
    if isinstance(func, functools.partial):
        func = func.func
    return f"{func.__module__}.{func.__qualname__}"


def _payloads(marker: Path) -> dict[str, Payload]:
    code = f"open({str(marker)!r}, 'w').close()"
    touch = f"touch {shlex.quote(str(marker))}"
    return {
        "os.system": Payload(os.system, touch),
        "builtins.exec": Payload(builtins.exec, code),
        "builtins.eval": Payload(builtins.eval, code),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        # REDUCE calls partial() -> os.system(touch); os.system is still looked up by name
        "partial(os.system)": Payload(functools.partial(os.system, touch)),
    }


PAYLOADS = list(_payloads(Path("x")))
SYNCHRONOUS = [p for p in PAYLOADS if p != "subprocess.Popen"]


def _small_state() -> dict[str, torch.Tensor]:
    return {"backbone.conv1.weight": torch.ones(4, 3, 3, 3), "backbone.bn1.weight": torch.ones(4)}


def _write(path: Path, payload: Payload, where: str) -> Path:
    if where == "in_state_dict":
        obj = {"state_dict": {**_small_state(), "backbone.evil": payload}}
    elif where == "lr_schedulers":  # an ignored part, next to a harmless partial(max, 0.0)
        obj = _lightning(lr_lambdas=[functools.partial(max, 0.0), payload])
    else:  # deep inside other Lightning-style entries
        obj = {"state_dict": _small_state(), "hyper_parameters": {"a": [{"b": (1, payload)}]}, "epoch": 3}
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("where", ["in_state_dict", "nested", "lr_schedulers"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, name, where):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    ckpt = _write(tmp_path / "evil.ckpt", payload, where)
    loaders = {
        "read_checkpoint": lambda: read_checkpoint(ckpt),
        "solo": lambda: load_encoder(f"solo:{ckpt}"),
        "torchvision": lambda: load_encoder(f"torchvision:resnet18:{ckpt}"),
    }
    for loader, call in loaders.items():
        with pytest.raises(CheckpointError) as err:
            call()
        msg = str(err.value)
        assert f"refusing to load {ckpt}" in msg, loader
        assert f"it references {_qualified(payload.func)}, which could run code" in msg, loader
    assert not marker.exists()


@pytest.mark.parametrize("name", SYNCHRONOUS)
def test_control_the_payloads_are_live_under_plain_pickle(tmp_path, name):
    """Proves the files above really would run code if unpickled without restrictions."""
    marker = tmp_path / "pwned"
    ckpt = _write(tmp_path / "evil.ckpt", _payloads(marker)[name], "nested")
    torch.load(ckpt, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "func",
    [
        builtins.getattr,
        builtins.__import__,
        builtins.open,
        builtins.compile,
        importlib.import_module,
        operator.attrgetter,
        operator.methodcaller,
        torch.load,
        np.load,
        pickle.loads,
        marshal.loads,
        runpy.run_path,
        shutil.rmtree,
        types.SimpleNamespace,  # the types module also builds functions and code objects
    ],
    ids=_qualified,
)
def test_other_dangerous_globals_are_refused(tmp_path, func):
    ckpt = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload(func, "/nonexistent-genaf-test-path")}, ckpt)
    with pytest.raises(CheckpointError, match="which could run code"):
        read_checkpoint(ckpt)


def test_oversized_constructor_is_refused(tmp_path):
    ckpt = tmp_path / "bomb.pt"
    torch.save({"w": torch.ones(2), "x": Payload(bytes, 2**62)}, ckpt)
    with pytest.raises(LimitError, match=r"bytes\(4,611,686,018,427,387,904\) built by the pickle.*max_file_expansion"):
        read_checkpoint(ckpt)


def test_unknown_globals_become_inert_placeholders_and_are_never_imported(tmp_path):
    name = "genaf_test_no_such_module_xyz"
    module = types.ModuleType(name)

    class Thing:
        def __init__(self, x):
            self.x = x

    class Called:
        def __reduce__(self):
            return Thing, (7,)

    Thing.__module__, Thing.__qualname__ = name, "Thing"
    module.Thing = Thing
    sys.modules[name] = module
    try:
        ckpt = tmp_path / "odd.pt"
        torch.save({"w": torch.arange(3), "obj": Thing(5), "called": Called()}, ckpt)
    finally:
        del sys.modules[name]

    out = read_checkpoint(ckpt)

    assert name not in sys.modules
    assert torch.equal(out["w"], torch.arange(3))
    assert isinstance(out["obj"], InertGlobal) and out["obj"].global_name == f"{name}.Thing"
    assert out["obj"].state == {"x": 5}
    assert isinstance(out["called"], InertGlobal) and out["called"].args == (7,)
    assert type(out["obj"]) is type(out["called"])  # one placeholder class per global


def test_plain_state_dict_round_trips(tmp_path):
    sd = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    ckpt = tmp_path / "plain.pth"
    torch.save(sd, ckpt)
    out = read_checkpoint(ckpt)
    assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def _every_kind_of_tensor() -> dict[str, torch.Tensor]:
    base = torch.randn(4, 5)
    return {
        "f32": base,
        "strided_view": base[1:, ::2],  # shares the storage of f32, with an offset and strides
        "f16": torch.randn(3).half(),
        "bf16": torch.randn(3).bfloat16(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(5),
        "i32": torch.arange(5).int(),
        "i16": torch.arange(3).short(),
        "i8": torch.arange(-2, 2).to(torch.int8),
        "u8": torch.arange(3).to(torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "conj_view": torch.randn(3, dtype=torch.complex64).conj(),
        "neg_view": torch.randn(3)._neg_view(),
        "u16": torch.tensor([1, 2, 60000]).to(torch.uint16),  # written with _rebuild_tensor_v3
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.randn(2)),
    }


def test_restricted_reader_rebuilds_every_dense_dtype_and_plain_values(tmp_path):
    tensors = _every_kind_of_tensor()
    values = {
        "size": torch.Size([1, 2]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "od": collections.OrderedDict(a=1, b=[2, 3]),
        "dd": collections.defaultdict(list, k=[1]),
        "set": {1, 2},
        "frozenset": frozenset({3}),
        "bytes": b"\x00abc",
        "bytearray": bytearray(b"xy"),
        "range": range(3),
        "slice": slice(1, 5, 2),
        "complex": 1 + 2j,
        "tuple": (1, "a", None, True, 2.5),
    }
    ckpt = tmp_path / "mixed.pt"
    # argparse.Namespace makes torch's weights-only loader refuse, so genaf's reader runs
    torch.save({**tensors, **values, "ns": argparse.Namespace(lr=0.1)}, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)

    out = read_checkpoint(ckpt)

    for k, t in tensors.items():
        expected = t.detach().resolve_conj().resolve_neg()
        assert out[k].dtype == t.dtype and out[k].shape == t.shape, k
        assert torch.equal(out[k], expected), k
    assert isinstance(out["param"], torch.nn.Parameter)
    assert out["strided_view"].untyped_storage().data_ptr() == out["f32"].untyped_storage().data_ptr()
    for k, v in values.items():
        assert out[k] == v and type(out[k]) is type(v), k
    assert out["ns"].global_name == "argparse.Namespace" and out["ns"].state == {"lr": 0.1}


def test_big_endian_files_are_byte_swapped(tmp_path):
    tensors = {
        "f32": torch.randn(5),
        "f16": torch.randn(3).half(),
        "i64": torch.tensor([1, -2, 2**40]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "u8": torch.arange(4).to(torch.uint8),
    }
    src = tmp_path / "little.pt"
    torch.save({**tensors, "ns": argparse.Namespace()}, src)
    prefix = zip_prefix(src)
    replace: dict[str, bytes | None] = {f"{prefix}/byteorder": b"big"}
    for key, t in enumerate(tensors.values()):  # storages are numbered in pickling order
        size = t.element_size() // (2 if t.is_complex() else 1)
        replace[f"{prefix}/data/{key}"] = t.view(torch.uint8).view(-1, size).flip(1).contiguous().numpy().tobytes()
    dst = tmp_path / "big.pt"
    rewrite_zip(src, dst, replace)

    out = read_checkpoint(dst)

    for k, t in tensors.items():
        assert torch.equal(out[k], t), k


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(f"solo:{tmp_path / 'nope.ckpt'}")


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "text"])
def test_unreadable_files(tmp_path, kind):
    ckpt = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": _small_state()}, ckpt)
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        ckpt.write_bytes(b"")
    else:
        ckpt.write_text(json.dumps({"not": "a checkpoint"}))
    for call in (lambda: read_checkpoint(ckpt), lambda: load_encoder(f"solo:{ckpt}")):
        with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
            call()


def test_missing_storage_entry(tmp_path):
    src = tmp_path / "full.pt"
    torch.save({"w": torch.ones(3), "ns": argparse.Namespace()}, src)
    dst = tmp_path / "holed.pt"
    rewrite_zip(src, dst, {f"{zip_prefix(src)}/data/0": None})
    with pytest.raises(CheckpointError, match=r"storage '.*/data/0' is missing from the archive"):
        read_checkpoint(dst)


def test_legacy_format(tmp_path):
    plain = tmp_path / "legacy-plain.pt"
    torch.save({"w": torch.ones(2)}, plain, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(plain)["w"], torch.ones(2))  # torch's weights-only loader reads it

    rich = tmp_path / "legacy-rich.pt"
    torch.save({"w": torch.ones(2), "ns": argparse.Namespace()}, rich, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .* re-save it with a recent torch"):
        read_checkpoint(rich)


def test_state_dict_helpers():
    t = torch.zeros(1)
    wrapped = {"model": {"state_dict": {"a.b": t, "a.c": t, "n": 3}}, "epoch": 1}
    assert list(tensor_dict(wrapped, "x")) == ["a.b", "a.c"]
    assert key_prefixes(["backbone.x", "backbone.y", "queue", "head.z"]) == ["backbone.*", "queue", "head.*"]
    assert extract_state_dict({"encoder.w": t, "q": t}, ["backbone.", "encoder."], "x") == (
        "encoder.",
        {"w": t},
    )
    with pytest.raises(CheckpointError, match=r"has no 'backbone\.\*' keys; found: model\.\*, head\.\*"):
        extract_state_dict({"model.w": t, "head.b": t}, ["backbone."], "checkpoint x.ckpt")
    with pytest.raises(CheckpointError, match="contains no tensors"):
        tensor_dict({"epoch": 1}, "x")


def test_plain_files_go_through_torchs_weights_only_loader(tmp_path, monkeypatch):
    import genaf.encoders.safe_load as safe_load

    def boom(*args, **kwargs):
        raise AssertionError("the restricted reader should not be needed for a plain state dict")

    monkeypatch.setattr(safe_load, "_restricted_load", boom)
    ckpt = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    assert torch.equal(read_checkpoint(ckpt)["w"], torch.ones(2))


def test_globals_other_libraries_allow_in_torch_load_are_not_trusted(tmp_path):
    ckpt = tmp_path / "ns.pt"
    torch.save({"w": torch.ones(2), "ns": argparse.Namespace(a=1)}, ckpt)
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert isinstance(torch.load(ckpt, weights_only=True)["ns"], argparse.Namespace)
        out = read_checkpoint(ckpt)
    assert isinstance(out["ns"], InertGlobal) and out["ns"].state == {"a": 1}


# --------------------------------------------------------------------------------------------
# Parts genaf never uses are read into inert placeholders (issue 18, part 9)
# --------------------------------------------------------------------------------------------


def _lightning(lr_lambdas=None, **extra) -> dict:
    """A real-shaped Lightning checkpoint: backbone + projector tensors, SGD state, a LambdaLR's
    state whose lambda is ``functools.partial(max, 0.0)``, callbacks and hyper-parameters."""
    from genaf.encoders.resnet import ResNetBackbone

    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", width=4, stem="cifar").state_dict()
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state["projector.0.weight"] = torch.randn(8, 32)
    params = [torch.nn.Parameter(v.clone()) for v in state.values() if v.is_floating_point()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=functools.partial(max, 0.0))
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    sched.step()
    sched_state = sched.state_dict()
    # LambdaLR keeps a callable object's __dict__; a checkpoint written by a patched scheduler or
    # by Lightning's own config keeps the callable itself, which is what genaf must tolerate.
    sched_state["lr_lambdas"] = lr_lambdas if lr_lambdas is not None else [functools.partial(max, 0.0)]
    return {
        "epoch": 7,
        "global_step": 700,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": state,
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched_state],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
                "best_model_path": Path("/ckpts/best.ckpt"),
                "kth_value": torch.tensor(float("inf")),
                "dirpath": Path("/ckpts"),
            },
            "EarlyStopping": {"wait_count": 0, "min_delta": abs(-0.0), "key": functools.partial(min, 1)},
        },
        "hyper_parameters": {
            "cfg": argparse.Namespace(method="simclr", lr=0.1, warmup=functools.partial(max, 0.0)),
            "sort": sorted,
        },
        **extra,
    }


def test_a_real_lightning_checkpoint_loads_with_its_unused_parts_stubbed(tmp_path):
    obj = _lightning()
    ckpt = tmp_path / "simclr-epoch=7.ckpt"
    torch.save(obj, ckpt)

    with pytest.warns(PlaceholderWarning) as record:
        out = read_checkpoint(ckpt)

    msg = str(record[0].message)
    for name in ("builtins.max", "builtins.min", "builtins.sorted", "functools.partial", "argparse.Namespace"):
        assert name in msg, msg
    assert "under lr_schedulers, callbacks, hyper_parameters" in msg
    # the tensors are exact; the stubbed callables are inert records, never called
    for k, v in obj["state_dict"].items():
        assert torch.equal(out["state_dict"][k], v), k
    assert torch.equal(
        out["optimizer_states"][0]["state"][0]["momentum_buffer"],
        obj["optimizer_states"][0]["state"][0]["momentum_buffer"],
    )
    lam = out["lr_schedulers"][0]["lr_lambdas"][0]
    assert isinstance(lam, InertGlobal) and lam.global_name == "functools.partial" and not callable(lam)
    assert lam.args[0].__name__ == "max" and lam.args[0].global_name == "builtins.max"
    assert out["hyper_parameters"]["cfg"].state["lr"] == 0.1
    assert out["lr_schedulers"][0]["last_epoch"] == 1

    with pytest.warns(PlaceholderWarning, match="builtins.max"):
        enc = load_encoder(f"solo:{ckpt}")
    assert torch.equal(enc.backbone.conv1.weight, obj["state_dict"]["backbone.conv1.weight"])


def test_a_placeholder_inside_the_state_dict_is_refused(tmp_path):
    ckpt = tmp_path / "odd.ckpt"
    obj = _lightning()
    obj["state_dict"]["backbone.fc.scale"] = functools.partial(max, 0.0)
    torch.save(obj, ckpt)
    with pytest.raises(
        CheckpointError, match=r"state dict entries backbone\.fc\.scale are not tensors but functools\.partial"
    ):
        load_encoder(f"solo:{ckpt}")


CODE = {
    "partial(os.system) in lr_lambdas": ("lr_schedulers", lambda m: functools.partial(os.system, f"touch {m}")),
    "builtins.eval in callbacks": ("callbacks", lambda m: Payload(builtins.eval, f"open({str(m)!r}, 'w')")),
    "builtins.exec in hyper_parameters": (
        "hyper_parameters",
        lambda m: Payload(builtins.exec, f"open({str(m)!r}, 'w')"),
    ),
    "builtins.__import__ in optimizer_states": ("optimizer_states", lambda m: Payload(builtins.__import__, "os")),
    "builtins.getattr in callbacks": ("callbacks", lambda m: Payload(builtins.getattr, "genaf", "upper")),
    "subprocess.Popen in hyper_parameters": (
        "hyper_parameters",
        lambda m: Payload(subprocess.Popen, ["touch", str(m)]),
    ),
    "os.system in the state dict": ("state_dict", lambda m: Payload(os.system, f"touch {m}")),
}


def _plant(obj: dict, part: str, evil) -> dict:
    if part == "lr_schedulers":
        obj[part][0]["lr_lambdas"].append(evil)
    elif part == "optimizer_states":
        obj[part][0]["param_groups"][0]["foreach"] = evil
    elif part == "state_dict":
        obj[part]["backbone.evil"] = evil
    elif part == "callbacks":
        obj[part]["EarlyStopping"]["check"] = evil
    else:
        obj[part]["extra"] = [evil]
    return obj


@pytest.mark.parametrize("name", list(CODE))
def test_code_anywhere_in_a_real_shaped_checkpoint_is_refused_by_name(tmp_path, name):
    marker = tmp_path / "pwned"
    part, make = CODE[name]
    evil = make(marker)
    ckpt = tmp_path / "evil.ckpt"
    torch.save(_plant(_lightning(), part, evil), ckpt)
    func = evil.func if isinstance(evil, (Payload, functools.partial)) else evil
    for call in (lambda: read_checkpoint(ckpt), lambda: load_encoder(f"solo:{ckpt}")):
        with pytest.raises(CheckpointError, match=f"it references {_qualified(func)}, which could run code"):
            call()
    assert not marker.exists()


def test_placeholder_outcomes_are_recorded_for_the_reliability_table(tmp_path):
    """Runs every part-9 input once more and writes docs/reliability/placeholders.json."""
    from genaf.utils import write_json

    section = "9. A real checkpoint refused for a part genaf never uses"
    rows = []

    def record(desc: str, obj: dict, expect: str) -> None:
        ckpt = tmp_path / f"case{len(rows)}.ckpt"
        torch.save(obj, ckpt)
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_encoder(f"solo:{ckpt}")
                got = "loaded with a warning" if caught else "loaded without a warning"
                message = str(caught[0].message) if caught else ""
            except CheckpointError as exc:
                got, message = "refused by name", str(exc)
        outcome = got if got == expect else "failed"
        rows.append(
            {"section": section, "input": desc, "outcome": outcome, "message": message.replace(str(tmp_path), "<tmp>")}
        )

    record(
        "Lightning checkpoint: LambdaLR with functools.partial(max, 0.0), callbacks, Namespace hyper-parameters",
        _lightning(),
        "loaded with a warning",
    )
    record(
        "the same with lr_lambdas = [None]: builtins.max/min/sorted only in callbacks and hyper-parameters",
        _lightning(lr_lambdas=[None]),
        "loaded with a warning",
    )
    marker = tmp_path / "pwned"
    for name, (part, make) in CODE.items():
        record(name, _plant(_lightning(), part, make(marker)), "refused by name")
    obj = _lightning()
    obj["state_dict"]["backbone.fc.scale"] = functools.partial(max, 0.0)
    record("functools.partial(max, 0.0) as a state dict entry (a tensor genaf reads)", obj, "refused by name")
    assert not marker.exists()

    out = Path(__file__).resolve().parents[2] / "docs" / "reliability" / "placeholders.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rows)
    assert [r for r in rows if r["outcome"] == "failed"] == []


@pytest.mark.parametrize(
    "name",
    ["list(range(10**7))", "10000 copies of one list", "bytes(10**7)", "str of a nested list"],
)
def test_values_the_pickle_builds_by_calls_are_charged_to_the_file(tmp_path, name):
    """A few bytes of pickle can ask for big values (constructors, copies of one container many
    times): each call is charged, before it runs, against max_file_expansion x the size on disk."""
    shared = list(range(1000))
    nested = [shared]
    for _ in range(40):  # repr of this doubles 40 times: the reader refuses to convert it to text
        nested = [nested, nested]
    values = {
        "list(range(10**7))": Payload(list, range(10**7)),
        "10000 copies of one list": [Payload(tuple, shared) for _ in range(10000)],
        "bytes(10**7)": Payload(bytes, 10**7),
        "str of a nested list": Payload(str, nested),
    }
    ckpt = tmp_path / "amplify.ckpt"
    torch.save({"w": torch.ones(2), "ns": argparse.Namespace(), "x": values[name]}, ckpt)
    error = CheckpointError if name.startswith("str") else LimitError
    with pytest.raises(error, match="converts a list to text" if name.startswith("str") else "max_file_expansion"):
        read_checkpoint(ckpt)
