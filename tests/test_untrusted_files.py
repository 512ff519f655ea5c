"""Pickles that would run code are refused by every loader that reads a file, and never run."""

import builtins
import functools
import os
import shlex
import subprocess

import pytest
import torch

from genaf.api import finetune
from genaf.attacks import Perturbation
from genaf.encoders import load_encoder
from genaf.errors import GenafError
from genaf.models import load_model


class Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    touch = f"touch {shlex.quote(str(marker))}"
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Payload(os.system, touch),
        "exec": Payload(builtins.exec, code),
        "eval": Payload(builtins.eval, code),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "partial(os.system)": Payload(functools.partial(os.system, touch)),
    }


@pytest.mark.parametrize("name", list(payloads("x")))
def test_every_loader_refuses_code(tmp_path, name, tiny_data):
    marker = tmp_path / "pwned"
    evil = {"state_dict": {"backbone.conv1.weight": torch.ones(2), "x": payloads(marker)[name]}}
    pt = tmp_path / "evil.pt"
    torch.save(evil, pt)
    # a genaf encoder file
    with pytest.raises(GenafError):
        load_encoder(f"file:{pt}")
    # a perturbation file
    with pytest.raises(GenafError):
        Perturbation.load(pt)
    # a run directory whose weights are a pickle
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text('{"format": "genaf-model"}')
    (run / "model.safetensors").write_bytes(pt.read_bytes())
    with pytest.raises(GenafError):
        load_model(run)
    # --resume from a poisoned checkpoint
    resume = tmp_path / "resume"
    resume.mkdir()
    torch.save({"format": "genaf-checkpoint", "evil": payloads(marker)[name]}, resume / "checkpoint.pt")
    with pytest.raises(GenafError):
        finetune(
            "random:demo",
            "fashion-mnist",
            "sft",
            resume,
            method_config={"epochs": 1},
            datamodule=tiny_data,
            resume=True,
            log=lambda *_: None,
        )
    assert not marker.exists()
