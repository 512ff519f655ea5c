"""Small files that would exhaust memory are refused before anything is allocated (issue 18, part 1).

Each hostile file is built here, then read by ``genaf <cmd> ...`` (``genaf.cli.main``, what
``python -m genaf`` runs) or by ``genaf.models.load_model`` in a child process whose data segment
is capped with ``RLIMIT_DATA`` far below the machine's memory. A refusal must be exit code 2 with
one stderr line that names the limit; the same cap must leave real files loadable, and
``--limit`` / ``GENAF_LIMIT_*`` must raise a limit.

One interpreter imports torch and genaf once, then forks a child per case (the cap is set in the
child, its stderr goes to a file): a fresh interpreter per case would cost a torch import each.
When every case has run, the outcomes are written to docs/reliability/memory.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from genaf.utils import write_json

ROOT = Path(__file__).resolve().parents[1]
# torch (with its CUDA libraries) maps ~0.9 GB of data segments at import: 2 GiB leaves ~1 GiB.
RLIMIT = 2 << 30
SECTION = "1. Small files that exhaust memory"


class Payload:
    """Unpickles as ``func(*args)`` (how torch's allow-list is made to call bytearray(n))."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# ----------------------------------------------------------------------------------------------
# Building the files
# ----------------------------------------------------------------------------------------------


def _write_zip(dst: Path, entries: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip written by hand: (name, payload, method, crc, uncompressed size) per record, so a
    record can carry deflate data that was never inflated here."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, usize in entries:
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), usize, len(raw), 0)
        out += raw + data
        fields = (0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), usize, len(raw), 0, 0, 0, 0, 0, offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", *fields)
        central += raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    dst.write_bytes(bytes(out + central + end))


def _stored(zf: zipfile.ZipFile) -> list[tuple[str, bytes, int, int, int]]:
    return [(i.filename, zf.read(i), 0, i.CRC, i.file_size) for i in zf.infolist()]


def _zip_bomb(src: Path, dst: Path, inflated: int) -> None:
    """Replace the first tensor storage of a torch.save archive by a deflate record of
    ``inflated`` zero bytes (~1 KB per MB on disk: built from one repeated compressed block)."""
    chunk = 1 << 24
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    n = inflated // chunk
    data = block * n + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    crc, zeros = 0, bytes(chunk)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    with zipfile.ZipFile(src) as zf:
        entries = _stored(zf)
    entries = [(e[0], data, 8, crc, n * chunk) if e[0].endswith("/data/0") else e for e in entries]
    _write_zip(dst, entries)


class _FakeStorage:
    pass


_STORAGE = _FakeStorage()


class _HugeTensor:
    """Pickles as torch's tensor rebuilder over storage '0' declared with ``numel`` floats."""

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_STORAGE, 0, (1,), (1,), False, collections.OrderedDict())


def _declared_storage_file(dst: Path, numel: int) -> None:
    """A torch.save-shaped archive whose only storage declares ``numel`` floats but holds 4 bytes."""
    import io
    import pickle

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is _STORAGE:
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"format": "genaf-encoder", "version": 1, "meta": {}, "state_dict": {"w": _HugeTensor()}})
    pkl = buf.getvalue()
    entries = [
        ("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
        ("archive/byteorder", b"little", 0, zlib.crc32(b"little"), 6),
        ("archive/data/0", bytes(4), 0, zlib.crc32(bytes(4)), 4),
        ("archive/version", b"3\n", 0, zlib.crc32(b"3\n"), 2),
    ]
    _write_zip(dst, entries)


def _legacy_declared_storage_file(dst: Path, numel: int) -> None:
    """torch's pre-1.6 format (five pickles, then raw storages) whose storage declares ``numel``
    floats and holds one: torch's legacy loader allocates the declared size before reading."""
    import io
    import pickle

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is _STORAGE:
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None)
            return None

    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                buf, protocol=2)  # fmt: skip
    P(buf, protocol=2).dump({"w": _HugeTensor()})
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", 1) + bytes(4))
    dst.write_bytes(buf.getvalue())


def _backbone_state(width: int, stem: str = "cifar") -> dict[str, torch.Tensor]:
    from genaf.encoders.resnet import ResNetBackbone

    torch.manual_seed(0)
    return ResNetBackbone("resnet18", width=width, stem=stem).state_dict()


def _lightning_file(dst: Path, width: int = 8) -> None:
    """A real-shaped solo-learn/Lightning checkpoint: state dict, optimizer and scheduler state
    (a LambdaLR whose lambda is functools.partial(max, 0.0)), callbacks and hyper-parameters."""
    state = {f"backbone.{k}": v for k, v in _backbone_state(width).items()}
    state["projector.0.weight"] = torch.randn(4, 8 * width)
    params = [v for v in state.values() if v.is_floating_point()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=functools.partial(max, 0.0))
    sched_state = sched.state_dict()
    sched_state["lr_lambdas"] = [functools.partial(max, 0.0)]  # what a callable object leaves there
    obj = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched_state],
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": Path("/ckpt")}},
        "hyper_parameters": {"cfg": argparse.Namespace(method="simclr", lr=0.1, warmup=functools.partial(max, 0.0))},
    }
    torch.save(obj, dst)


def _stride0_file(dst: Path, width: int = 4096) -> None:
    """A solo-learn-shaped checkpoint whose every tensor is a stride-0 view of one float: a few KB
    on disk claiming a ResNet-18 of width 4096 (tens of GB once materialised or built)."""
    from genaf.encoders.resnet import ResNetBackbone

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ResNetBackbone("resnet18", width=width, stem="cifar").state_dict().items()}
    one = torch.zeros(1)
    state = {f"backbone.{k}": one.expand(s) if len(s) else torch.zeros(()) for k, s in shapes.items()}
    torch.save({"state_dict": state}, dst)


def _encoder_safetensors(dst: Path, width: int, real: bool) -> None:
    from safetensors.torch import save_file

    meta = {"arch": "resnet18", "width": width, "stem": "cifar", "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    if real:
        state = {f"backbone.{k}": v.contiguous() for k, v in _backbone_state(width).items()}
    else:
        state = {"backbone.conv1.weight": torch.zeros(1)}
    save_file(state, str(dst), metadata={"genaf_encoder": json.dumps(meta)})


def _lying_safetensors(dst: Path) -> None:
    """A 100-byte safetensors file whose header declares a 100000 x 100000 float tensor."""
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4]}}).encode()
    dst.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))


def _run_dir(dst: Path, num_classes=10, width: int | None = None) -> None:
    """A finished run directory (random:demo encoder, linear head); model.json then edited."""
    from genaf.encoders import load_encoder
    from genaf.models import DownstreamModel, save_model

    dst.mkdir()
    save_model(DownstreamModel(load_encoder("random:demo"), 10, head="linear"), dst)
    spec = json.loads((dst / "model.json").read_text())
    spec["num_classes"] = num_classes
    if width is not None:
        spec["encoder"]["width"] = width
    (dst / "model.json").write_text(json.dumps(spec))


# Runs every case in a forked child of one interpreter that has imported torch and genaf.
# argv[1]: a JSON list of [argv, env, stderr_path]; prints one exit code per case.
DRIVER = r"""
import json, os, resource, sys
import torch, torchvision  # noqa: F401  (imported once, before forking)
import genaf.api, genaf.cli, genaf.models  # noqa: F401
from genaf.errors import GenafError

limit = int(sys.argv[2])
for argv, env, err in json.loads(open(sys.argv[1]).read()):
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(err + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            for k in [k for k in os.environ if k.startswith("GENAF_LIMIT_")]:
                del os.environ[k]
            os.environ.update(env)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            if argv[0] == "load_model":
                try:
                    genaf.models.load_model(argv[1])
                    rc = 0
                except GenafError as exc:
                    print(f"load_model: error: {exc}", file=sys.stderr)
                    rc = 2
            else:
                rc = genaf.cli.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 1
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""

# ----------------------------------------------------------------------------------------------
# The cases: (id, description, argv after the interpreter, extra environment, expected)
# expected: ("refused", limit named in the one stderr line) or ("loads", text expected on stderr)
# ----------------------------------------------------------------------------------------------


def _cases(d: Path) -> list[tuple[str, str, list[str], dict, tuple[str, str]]]:
    g: list[str] = []
    return [
        ("torch-bytearray", "1 KB torch file: torch's allow-list asked for bytearray(1,400,000,000)",
         g + ["inspect", f"torchvision:resnet18:{d / 'bytearray.pt'}"], {}, ("refused", "max_file_expansion")),
        ("torch-declared-storage", "1 KB torch file whose one storage declares 1.4 GB (holds 4 bytes)",
         g + ["inspect", f"file:{d / 'storage.pt'}"], {}, ("refused", "max_file_expansion")),
        ("legacy-declared-storage", "1 KB legacy (pre-1.6) torch file whose storage declares 1.4 GB",
         g + ["inspect", f"torchvision:resnet18:{d / 'legacy.pt'}"], {}, ("refused", "max_file_expansion")),
        ("zip-bomb", "1.4 MB Lightning file whose deflated storage record inflates to 1.4 GB (restricted reader)",
         g + ["inspect", f"solo:{d / 'bomb.ckpt'}"], {}, ("refused", "max_file_expansion")),
        ("wide-metadata", "260-byte genaf encoder file whose metadata says width: 4096",
         g + ["inspect", f"file:{d / 'wide.safetensors'}"], {}, ("refused", "max_width")),
        ("stride0", "few-KB checkpoint of stride-0 tensors claiming a width-4096 ResNet-18",
         g + ["inspect", f"solo:{d / 'stride0.ckpt'}"], {}, ("refused", "max_file_expansion")),
        ("safetensors-header", "100-byte safetensors file whose header declares a 100000 x 100000 float tensor",
         g + ["inspect", f"torchvision:resnet18:{d / 'lying.safetensors'}"], {}, ("refused", "max_tensor_bytes")),
        ("num-classes-1e7", "run directory whose model.json says num_classes: 1e7",
         ["load_model", str(d / "run-1e7")], {}, ("refused", "max_num_classes")),
        ("run-width-1024", "run directory whose model.json says encoder width 1024 (within max_width)",
         ["load_model", str(d / "run-wide")], {}, ("refused", "max_file_expansion")),
        # --limit and GENAF_LIMIT_* raise a limit: the next check (the file's size) still holds.
        ("wide-metadata --limit", "the width-4096 file with --limit max_width=8192",
         g + ["inspect", f"file:{d / 'wide.safetensors'}", "--limit", "max_width=8192"], {},
         ("refused", "max_file_expansion")),
        ("num-classes-1e7 env", "the num_classes: 1e7 run with GENAF_LIMIT_MAX_NUM_CLASSES=1e8",
         ["load_model", str(d / "run-1e7")], {"GENAF_LIMIT_MAX_NUM_CLASSES": "1e8"},
         ("refused", "max_file_expansion")),
        ("real encoder, lowered limit", "a real width-8 encoder file with GENAF_LIMIT_MAX_WIDTH=4",
         g + ["inspect", f"file:{d / 'enc.safetensors'}"], {"GENAF_LIMIT_MAX_WIDTH": "4"}, ("refused", "max_width")),
        # Real files under the same cap.
        ("real encoder, raised again", "the same with --limit max_width=8 (the flag wins over the environment)",
         g + ["inspect", f"file:{d / 'enc.safetensors'}", "--limit", "max_width=8"], {"GENAF_LIMIT_MAX_WIDTH": "4"},
         ("loads", "")),
        ("real lightning", "real-shaped Lightning checkpoint (optimizer, LambdaLR with partial(max, 0.0), callbacks)",
         g + ["inspect", f"solo:{d / 'real.ckpt'}"], {},
         ("loads", "inert placeholders, never called: argparse.Namespace, builtins.max")),
        ("real torchvision", "plain torch.save state dict (width-16 ResNet-18)",
         g + ["inspect", f"torchvision:resnet18:{d / 'tv.pth'}"], {}, ("loads", "")),
        ("real run", "a finished run directory", ["load_model", str(d / "run-ok")], {}, ("loads", "")),
    ]  # fmt: skip


def _run_all(cases, d: Path) -> list[tuple[int, str]]:
    """(exit code, stderr) of every case, each in a forked child under RLIMIT_DATA."""
    jobs = [[c[2], c[3], str(d / f"stderr-{i}.txt")] for i, c in enumerate(cases)]
    (d / "cases.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENAF_LIMIT_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(d / "cases.json"), str(RLIMIT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    codes = [int(x) for x in proc.stdout.split()]
    assert len(codes) == len(cases), proc.stdout + proc.stderr
    return [(rc, Path(job[2]).read_text()) for rc, job in zip(codes, jobs)]


class _Proc:
    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    torch.save({"x": Payload(bytearray, 1_400_000_000)}, d / "bytearray.pt")
    _declared_storage_file(d / "storage.pt", 350_000_000)
    _legacy_declared_storage_file(d / "legacy.pt", 350_000_000)
    small = d / "small.ckpt"
    torch.save({"state_dict": {"backbone.w": torch.ones(4)}, "hyper_parameters": argparse.Namespace(a=1)}, small)
    _zip_bomb(small, d / "bomb.ckpt", 1_400_000_000)
    _encoder_safetensors(d / "wide.safetensors", 4096, real=False)
    _encoder_safetensors(d / "enc.safetensors", 8, real=True)
    _stride0_file(d / "stride0.ckpt")
    _lying_safetensors(d / "lying.safetensors")
    _lightning_file(d / "real.ckpt")
    torch.save(_backbone_state(16, stem="imagenet"), d / "tv.pth")
    _run_dir(d / "run-1e7", 1e7)
    _run_dir(d / "run-wide", width=1024)
    _run_dir(d / "run-ok", 10)
    cases = _cases(d)
    results = {c[0]: (c, _Proc(*r)) for c, r in zip(cases, _run_all(cases, d))}
    _write_fragment(results, d)
    return results


def _verdict(case, proc) -> tuple[bool, str]:
    kind, text = case[4]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if kind == "refused":
        ok = proc.returncode == 2 and len(lines) == 1 and text in lines[0]
        return ok, lines[-1] if lines else f"exit {proc.returncode}, no message"
    ok = proc.returncode == 0 and text in proc.stderr
    warned = [ln.strip() for ln in lines if "warning: " in ln]
    return ok, f"exit {proc.returncode}" + (f"; {warned[0]}" if warned else "") if ok or not lines else lines[-1]


def _write_fragment(results, tmp: Path) -> None:
    rows = []
    for case, proc in results.values():
        ok, message = _verdict(case, proc)
        if case[4][0] == "refused":
            outcome = "refused cleanly" if ok else "failed"
        else:
            outcome = "loaded" if ok else "failed"
        message = message.replace(str(tmp), "<tmp>")
        rows.append({"section": SECTION, "input": case[1], "outcome": outcome, "message": message})
    out = ROOT / "docs" / "reliability" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rows)


HOSTILE = [
    "torch-bytearray",
    "torch-declared-storage",
    "legacy-declared-storage",
    "zip-bomb",
    "wide-metadata",
    "stride0",
    "safetensors-header",
    "num-classes-1e7",
    "run-width-1024",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_is_refused_in_one_line_under_a_memory_cap(outcomes, name):
    case, proc = outcomes[name]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr[-2000:]
    assert case[4][1] in lines[0], lines[0]
    assert "raise the limit with --limit" in lines[0]


@pytest.mark.parametrize("name", ["wide-metadata --limit", "num-classes-1e7 env", "real encoder, lowered limit"])
def test_limits_are_raised_by_flag_and_environment(outcomes, name):
    case, proc = outcomes[name]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert case[4][1] in lines[0], lines[0]


@pytest.mark.parametrize("name", ["real encoder, raised again", "real lightning", "real torchvision", "real run"])
def test_real_files_load_under_the_same_cap(outcomes, name):
    case, proc = outcomes[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert case[4][1] in proc.stderr


def test_the_reliability_fragment_lists_every_case(outcomes):
    rows = json.loads((ROOT / "docs" / "reliability" / "memory.json").read_text())
    assert len(rows) == len(outcomes)
    assert all(r["section"] == SECTION for r in rows)
    failed = [r for r in rows if r["outcome"] == "failed"]
    assert not failed, failed
