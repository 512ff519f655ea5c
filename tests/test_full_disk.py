"""A full disk while writing leaves the previous checkpoint (and every result file) intact."""

import errno
import json

import pytest
import torch

from _reliability import recorder, section
from genaf import utils
from genaf.attacks.perturbation import Perturbation
from genaf.errors import GenafError

_record = recorder("full-disk.json", section(8), "handled: earlier files intact")


def _full_disk_after(n_bytes: int):
    """A file writer that writes ``n_bytes`` and then fails as a full disk does."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    return write


def _leftovers(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_survives_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    state = {"epoch": 3, "w": torch.arange(10.0)}
    utils.torch_save_atomic(state, path)
    before = path.read_bytes()

    real_save = torch.save

    def half_then_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # keep half of what was written, then fail
            fh.truncate(len(before) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(utils.torch, "save", half_then_full)
    with pytest.raises(GenafError, match="no space left.*previous version is intact.*--resume"):
        utils.torch_save_atomic({"epoch": 4, "w": torch.zeros(10)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    assert _leftovers(tmp_path) == []


def test_json_and_perturbation_survive_a_full_disk(tmp_path):
    m = tmp_path / "metrics.json"
    utils.write_json(m, {"clean_acc": 0.5})
    with pytest.raises(GenafError, match="no space left"):
        utils.atomic_write(m, _full_disk_after(3))
    assert json.loads(m.read_text()) == {"clean_acc": 0.5}

    p = tmp_path / "p.pt"
    pert = Perturbation(delta=torch.full((1, 1, 4, 4), 0.01), eps=0.05, attack="x")
    pert.save(p)
    with pytest.raises(GenafError, match="no space left"):
        utils.atomic_write(p, _full_disk_after(10))
    assert torch.equal(Perturbation.load(p).delta, pert.delta)
    assert _leftovers(tmp_path) == []


def test_first_write_on_a_full_disk_leaves_nothing(tmp_path):
    with pytest.raises(GenafError, match="nothing was written"):
        utils.atomic_write(tmp_path / "new.json", _full_disk_after(1))
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_pass_through(tmp_path):
    def fail(tmp):
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError):
        utils.atomic_write(tmp_path / "a.json", fail)


_SCRIPT = """
import resource, signal, sys, torch
from genaf import utils
from genaf.errors import GenafError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
path = sys.argv[1]
utils.torch_save_atomic({"epoch": 3, "w": torch.arange(10.0)}, path)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    utils.torch_save_atomic({"epoch": 4, "w": torch.zeros(1_000_000)}, path)
except GenafError as exc:
    print("GENAF:", exc)
"""


def test_a_real_write_failure_inside_torch_save_gives_the_message(tmp_path):
    """torch.save's own writer fails (a file-size limit stands in for a full disk): torch raises a
    RuntimeError, not OSError(ENOSPC); the message still appears and the old checkpoint stays."""
    import subprocess
    import sys

    path = tmp_path / "checkpoint.pt"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "GENAF:" in r.stdout and "previous version is intact" in r.stdout, r.stdout
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3
    assert _leftovers(tmp_path) == []


def test_a_really_full_file_system(tmp_path):
    """A 64 KiB tmpfs (needs mount permission: root in a container that allows it)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or not allowed)")
    try:
        path = mnt / "checkpoint.pt"
        utils.torch_save_atomic({"epoch": 3}, path)
        with pytest.raises(GenafError, match="disk full|no space left"):
            utils.torch_save_atomic({"epoch": 4, "w": torch.zeros(100_000)}, path)
        assert torch.load(path, weights_only=True)["epoch"] == 3 and _leftovers(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
