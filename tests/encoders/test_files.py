"""file:PATH — genaf's own encoder files round-trip exactly; other files are rejected clearly."""

from __future__ import annotations

import json

import pytest
import torch
from enc_helpers import images

from genaf.encoders import load_encoder, save_encoder
from genaf.encoders.resnet import ResNetBackbone
from genaf.errors import CheckpointError


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path, suffix):
    enc = load_encoder("random:demo")
    path = tmp_path / f"enc{suffix}"
    save_encoder(enc, path)

    back = load_encoder(f"file:{path}")

    assert back.meta["source"] == f"file:{path}"
    assert {k: v for k, v in back.meta.items() if k != "source"} == {k: v for k, v in enc.meta.items() if k != "source"}
    x = images(2, 28)
    with torch.no_grad():
        assert torch.equal(back(x), enc(x))
    sd, sd_back = enc.backbone.state_dict(), back.backbone.state_dict()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_solo_encoder_saved_as_genaf_file(tmp_path, suffix):
    torch.manual_seed(0)
    ref = ResNetBackbone("resnet18", width=8, stem="cifar", stem_padding=2)
    ckpt = tmp_path / "solo.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    (tmp_path / "args.json").write_text(
        json.dumps({"method": "mocov2plus", "backbone": "resnet18", "dataset": "cifar10"})
    )
    enc = load_encoder(f"solo:{ckpt}")
    path = tmp_path / f"solo{suffix}"
    save_encoder(enc, path)

    back = load_encoder(f"file:{path}")

    assert back.backbone.conv1.padding == (2, 2) and back.meta["method"] == "mocov2plus"
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(back(x), enc(x))


def test_pt_that_is_not_a_genaf_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="is not a genaf encoder file"):
        load_encoder(f"file:{path}")


def test_safetensors_without_genaf_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"conv1.weight": torch.ones(4, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="no 'genaf_encoder' metadata"):
        load_encoder(f"file:{path}")


def test_genaf_pt_that_needs_code_is_rejected(tmp_path):
    import argparse

    path = tmp_path / "odd.pt"
    torch.save({"format": "genaf-encoder", "version": 1, "meta": argparse.Namespace(), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_encoder(f"file:{path}")


def test_missing_genaf_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(f"file:{tmp_path / 'none.pt'}")
