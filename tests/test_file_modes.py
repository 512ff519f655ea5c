"""Outputs behave like files: the user's umask decides their mode (not the 0600 of the atomic
write's temporary file), a finished run holds no checkpoint.pt, and a perturbation's name ends
in .safetensors, the format it is written in."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from genaf.cli import main
from genaf.utils import atomic_write, perturbation_path, write_json

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dataset", "fashion-mnist-demo", "--n-train", "48", "--n-val", "16", "--n-test", "16"]


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, mask, want):
    with umask(mask):
        write_json(tmp_path / "a.json", {"x": 1})
        atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"1"))
    assert mode(tmp_path / "a.json") == want and mode(tmp_path / "b.bin") == want
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_finetune_run_and_perturbation_get_the_umask_mode(tmp_path, capsys):
    run = tmp_path / "run"
    with umask(0o022):
        argv = ["finetune", "--encoder", "random:demo", "--method", "sft", "--epochs", "1", "--batch-size", "16"]
        assert main(argv + DATA + ["--out", str(run), "--device", "cpu", "--quiet"]) == 0
        craft = ["attack", "--encoder", "random:demo", "--attack", "ssp-universal", "--eps", "16/255"]
        craft += ["--surrogate", "fashion-mnist-demo", "--n-surrogate", "16", "--set", "iterations=2"]
        assert main(craft + ["--out", str(tmp_path / "ssp.pt"), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    files = sorted(p for p in run.iterdir() if p.is_file() and p.name != ".genaf.lock")
    names = {p.name for p in files}
    assert {"config.yaml", "metrics.json", "history.json", "predictions.json"} <= names, names
    assert any(n.startswith("model") for n in names), names
    assert "checkpoint.pt" not in names  # a finished run keeps no checkpoint (train.keep_checkpoint)
    bad = {p.name: oct(mode(p)) for p in files if mode(p) != 0o644}
    assert not bad, f"run files not 0644 under umask 022: {bad}"
    assert mode(run) == 0o755
    # --out ssp.pt is written as ssp.safetensors, and the command says so
    pert = tmp_path / "ssp.safetensors"
    assert pert.is_file() and not (tmp_path / "ssp.pt").exists()
    assert "ssp.safetensors instead of" in out and "safetensors file" in out
    pics = sorted(tmp_path.glob("ssp*.png"))
    assert pics
    for p in [pert, *pics]:
        assert mode(p) == 0o644, (p.name, oct(mode(p)))
    from genaf.attacks.perturbation import Perturbation

    assert Perturbation.load(pert).attack == "ssp-universal"
    with open(pert, "rb") as fh:  # safetensors: an 8-byte header length, then a JSON header (no zip, no pickle)
        n = int.from_bytes(fh.read(8), "little")
        assert fh.read(1) == b"{" and 0 < n < pert.stat().st_size


@pytest.mark.parametrize(
    "given,written",
    [
        ("p.safetensors", "p.safetensors"),
        ("p.pt", "p.safetensors"),
        ("dir/p.pth", "dir/p.safetensors"),
        ("p.ckpt", "p.safetensors"),
        ("p", "p.safetensors"),
        ("p.v2", "p.v2.safetensors"),
    ],
)
def test_perturbation_names_end_in_safetensors(given, written):
    path, note = perturbation_path(given)
    assert path == Path(written)
    assert (note is None) == (given == written)
