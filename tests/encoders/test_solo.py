"""solo:PATH — solo-learn Lightning checkpoints load strictly, with the right stem and normalisation."""

from __future__ import annotations

import argparse
import functools
import json
import pickle
from pathlib import Path

import pytest
import torch
from enc_helpers import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, images, normalize
from torch import nn

from genaf.encoders import load_encoder
from genaf.encoders.resnet import ResNetBackbone
from genaf.encoders.solo import load_solo_encoder
from genaf.errors import CheckpointError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

LR_LAMBDA_CALLS: list[int] = []


def warmup_lambda(scale: int, epoch: int) -> float:
    """A module-level LR lambda like the ones Lightning pickles; it must never run on load."""
    LR_LAMBDA_CALLS.append(epoch)
    return scale * epoch


def heads(seed: int = 0) -> dict[str, torch.Tensor]:
    """Projector/predictor/classifier tensors a solo-learn checkpoint carries beside the backbone."""
    g = torch.Generator().manual_seed(seed)
    return {
        "projector.0.weight": torch.randn(32, 512, generator=g),
        "projector.0.bias": torch.randn(32, generator=g),
        "projector.2.weight": torch.randn(16, 32, generator=g),
        "classifier.weight": torch.randn(10, 512, generator=g),
        "classifier.bias": torch.randn(10, generator=g),
    }


def write_args(path: Path, args: dict) -> None:
    (path.parent / "args.json").write_text(json.dumps(args))


def test_flat_args_cifar10_checkpoint_matches_torchvision(tmp_path, cifar_tv_model):
    state = {f"backbone.{k}": v for k, v in cifar_tv_model.state_dict().items()}
    ckpt = tmp_path / "simclr-cifar10.ckpt"
    torch.save({"state_dict": {**state, **heads()}, "epoch": 999}, ckpt)
    write_args(ckpt, {"method": "simclr", "backbone": "resnet18", "dataset": "cifar10", "max_epochs": 1000})

    enc = load_encoder(f"solo:{ckpt}")

    assert not enc.training
    assert enc.backbone.conv1.padding == (2, 2)
    assert enc.backbone.conv1.kernel_size == (3, 3) and enc.backbone.conv1.stride == (1, 1)
    assert isinstance(enc.backbone.maxpool, nn.Identity)
    assert enc.arch == "resnet18" and enc.feature_dim == 512 and enc.input_size == 32
    assert enc.mean == pytest.approx(CIFAR10_MEAN) and enc.std == pytest.approx(CIFAR10_STD)
    assert enc.meta["method"] == "simclr" and enc.meta["pretrain_dataset"] == "cifar10"
    assert enc.meta["source"] == f"solo:{ckpt}"
    x = images(2, 32)
    with torch.no_grad():
        ours = enc(x)
        ref = cifar_tv_model(normalize(x, CIFAR10_MEAN, CIFAR10_STD))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_lightning_checkpoint_with_pickled_objects_and_hydra_args(tmp_path, cifar_tv_model):
    sd = cifar_tv_model.state_dict()
    state = {f"encoder.{k}": v for k, v in sd.items()}
    state.update({f"momentum_backbone.{k}": v.clone() for k, v in sd.items()})
    state.update(heads(1))
    state["queue"] = torch.randn(16, 8)
    ckpt = tmp_path / "byol-cifar100-epoch=399.ckpt"
    torch.save(
        {
            "epoch": 399,
            "global_step": 1234,
            "pytorch-lightning_version": "1.5.10",
            "state_dict": state,
            "hyper_parameters": argparse.Namespace(method="byol", backbone="resnet18", lr=1.0, cifar=True),
            "lr_schedulers": [{"lr_lambdas": [functools.partial(warmup_lambda, 3)], "last_epoch": 399}],
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
            "callbacks": {"ModelCheckpoint": {"best_model_path": Path("/somewhere/else.ckpt"), "monitor": None}},
        },
        ckpt,
    )
    write_args(
        ckpt,
        {
            "method": "byol",
            "backbone": {"name": "resnet18", "kwargs": {}},
            "data": {"dataset": "cifar100", "train_path": "./datasets", "num_workers": 4},
            "optimizer": {"name": "lars", "lr": 1.0},
        },
    )
    # The file holds more than tensors: torch's own weights-only loader refuses it, so this test
    # exercises genaf's restricted reader.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location="cpu", weights_only=True)

    enc = load_encoder(f"solo:{ckpt}")

    assert LR_LAMBDA_CALLS == []
    assert enc.meta["method"] == "byol" and enc.meta["pretrain_dataset"] == "cifar100"
    assert enc.mean == pytest.approx(CIFAR100_MEAN) and enc.std == pytest.approx(CIFAR100_STD)
    assert enc.backbone.conv1.padding == (2, 2)
    x = images(2, 32, seed=5)
    with torch.no_grad():
        assert torch.allclose(enc(x), cifar_tv_model(normalize(x, CIFAR100_MEAN, CIFAR100_STD)), atol=1e-5)


def test_renamed_prefix_lists_found_prefixes(tmp_path, cifar_tv_model):
    state = {f"net.{k}": v for k, v in cifar_tv_model.state_dict().items()}
    ckpt = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": {**state, **heads()}}, ckpt)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"solo:{ckpt}")
    msg = str(err.value)
    assert "'backbone.*'" in msg and "'encoder.*'" in msg
    assert "found: net.*, projector.*, classifier.*" in msg


def test_partially_renamed_key_lists_missing_and_unexpected(tmp_path, cifar_tv_model):
    state = {f"backbone.{k}": v for k, v in cifar_tv_model.state_dict().items()}
    state["backbone.layer1.0.convX.weight"] = state.pop("backbone.layer1.0.conv1.weight")
    ckpt = tmp_path / "partial.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"solo:{ckpt}")
    msg = str(err.value)
    assert "missing keys (1): layer1.0.conv1.weight" in msg
    assert "unexpected keys (1): layer1.0.convX.weight" in msg


def test_resnet50_inferred_without_args(tmp_path):
    torch.manual_seed(0)
    ref = ResNetBackbone("resnet50", width=16, stem="cifar", stem_padding=2).eval()
    ckpt = tmp_path / "nested" / "r50.ckpt"
    ckpt.parent.mkdir()
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    state["backbone.fc.weight"] = torch.randn(10, 512)  # a head left inside the backbone is dropped
    torch.save({"state_dict": state}, ckpt)

    enc = load_solo_encoder(ckpt)

    assert enc.arch == "resnet50" and enc.meta["width"] == 16 and enc.feature_dim == 16 * 8 * 4
    assert enc.meta["stem"] == "cifar" and enc.backbone.conv1.padding == (2, 2)
    assert enc.meta["pretrain_dataset"] == "unknown" and enc.meta["method"] == "unknown"
    assert any("assumed CIFAR-10" in n for n in enc.meta["notes"])
    x = images(2, 16)
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(normalize(x, CIFAR10_MEAN, CIFAR10_STD)), atol=1e-5)


def test_flat_encoder_key_imagenet_stem_and_stl10(tmp_path):
    torch.manual_seed(1)
    ref = ResNetBackbone("resnet18", width=8, stem="imagenet").eval()
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    write_args(ckpt, {"method": "barlow_twins", "encoder": "resnet18", "dataset": "stl10", "cifar": False})
    enc = load_solo_encoder(ckpt)
    assert enc.meta["stem"] == "imagenet" and enc.input_size == 96 and enc.meta["width"] == 8
    assert enc.mean == pytest.approx(IMAGENET_MEAN) and enc.std == pytest.approx(IMAGENET_STD)
    x = images(2, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(normalize(x, IMAGENET_MEAN, IMAGENET_STD)), atol=1e-5)


def test_unknown_dataset_with_imagenet_stem_says_so(tmp_path):
    ref = ResNetBackbone("resnet18", width=8, stem="imagenet")
    ckpt = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    write_args(ckpt, {"method": "simclr", "backbone": {"name": "resnet18"}, "data": {"dataset": "custom"}})
    enc = load_solo_encoder(ckpt)
    assert enc.mean == pytest.approx(IMAGENET_MEAN) and enc.input_size == 224
    assert any("'custom'" in n and "ImageNet" in n for n in enc.meta["notes"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            {"backbone": "resnet50", "dataset": "cifar10"},
            "args.json says 'resnet50' but the weights are a resnet18",
        ),
        ({"backbone": "vit_small", "dataset": "cifar10"}, "'vit_small', which genaf does not support"),
        ({"backbone": "resnet18", "dataset": "imagenet100"}, "implies the imagenet stem"),
    ],
)
def test_args_json_disagreeing_with_weights(tmp_path, args, needle):
    ref = ResNetBackbone("resnet18", width=8, stem="cifar", stem_padding=2)
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    write_args(ckpt, args)
    with pytest.raises(CheckpointError, match=needle):
        load_solo_encoder(ckpt)


def test_broken_args_json(tmp_path):
    ref = ResNetBackbone("resnet18", width=8, stem="cifar", stem_padding=2)
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="args.json is not readable JSON"):
        load_solo_encoder(ckpt)
