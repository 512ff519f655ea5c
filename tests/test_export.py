"""genaf export: a run's fine-tuned encoder round-trips through torchvision, timm and genaf files.

One tiny run (SFT, 1 epoch, 64 Fashion-MNIST images at 32 px) fine-tuned from a torchvision
resnet18 with random weights; each format is exported, loaded back with the spec it prints (and,
for torchvision and timm, with the library itself) and must give the run's encoder's features.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import genaf
from genaf.cli import main
from genaf.encoders import Encoder, load_encoder
from genaf.encoders.base import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from genaf.encoders.resnet import ResNetBackbone
from genaf.errors import CheckpointError, ConfigError, SpecError
from genaf.models import DownstreamModel, load_model, save_model

FASHION = Path("/usr/share/datasets/fashion-mnist")
ATOL = 1e-5  # same weights, same modules, same normalisation: equal up to float rounding

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def _features(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc.eval()(x)


@pytest.fixture(scope="module")
def tv_run(tmp_path_factory):
    """(run dir, the torchvision file it was fine-tuned from)."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    start = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), start)
    dm = genaf.load_dataset("fashion-mnist", image_size=32, n_train=64, n_val=32, n_test=32, seed=0)
    out = root / "run"
    with pytest.warns(UserWarning, match="pre-trained at 224 px"):
        genaf.finetune(
            f"torchvision:resnet18:{start}",
            "fashion-mnist",
            "sft",
            out,
            method_config={"epochs": 1},
            train={"batch_size": 32, "n_val_robust": 0, "augment": False, "progress": False},
            datamodule=dm,
            config={"eval": {"whitebox": None}},
            log=lambda *a: None,
        )
    return out, start


def _tiny_run(path: Path, enc: Encoder) -> Path:
    """A run directory holding ``enc`` under a linear head (what load_model reads)."""
    path.mkdir(parents=True)
    save_model(DownstreamModel(enc, 10, "linear"), path)
    return path


@pytest.mark.parametrize("name", ["enc.safetensors", "enc.pth"])
def test_torchvision_export_loads_in_genaf_and_in_torchvision(tv_run, tmp_path, name):
    run, start = tv_run
    out = tmp_path / name
    res = genaf.export(run, "torchvision", out)
    assert res["load_with"] == f"torchvision:resnet18:{out}" and res["verified"] and res["max_abs_diff"] <= ATOL
    x = _images()
    want = _features(load_model(run).encoder, x)
    got = _features(load_encoder(f"torchvision:resnet18:{out}"), x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the file is a plain torchvision state dict: torchvision's own resnet18 (fc removed) loads it strictly
    state = load_file(str(out)) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert "conv1.weight" in state and "layer1.0.conv1.weight" in state and "bn1.running_mean" in state
    assert not any(k.startswith("fc.") for k in state)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(state)
    norm = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(_features(tv, norm), want, atol=ATOL, rtol=0)
    # it is the fine-tuned encoder, not the file the run started from
    assert (_features(load_encoder(f"torchvision:resnet18:{start}"), x) - want).abs().max() > 1e-3


def test_timm_export_loads_in_genaf_and_in_timm(tv_run, tmp_path):
    timm = pytest.importorskip("timm")
    run, _ = tv_run
    out = tmp_path / "timm.safetensors"
    res = genaf.export(run, "timm", out)
    assert res["load_with"] == f"timm:resnet18:{out}"
    x = _images()
    want = _features(load_model(run).encoder, x)
    torch.testing.assert_close(_features(load_encoder(res["load_with"]), x), want, atol=ATOL, rtol=0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(out)))
    norm = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(_features(model, norm), want, atol=ATOL, rtol=0)


def test_safetensors_export_is_a_genaf_encoder_file(tv_run, tmp_path):
    run, _ = tv_run
    out = tmp_path / "genaf.safetensors"
    res = genaf.export(run, "safetensors", out)
    assert res["load_with"] == f"file:{out}"
    enc = load_encoder(f"file:{out}")
    x = _images()
    torch.testing.assert_close(_features(enc, x), _features(load_model(run).encoder, x), atol=ATOL, rtol=0)
    assert enc.meta["exported_from"]["method"] == "sft" and enc.meta["exported_from"]["run"] == str(run)


def test_cifar_stem_vit_and_other_normalisation_are_refused(tmp_path):
    cifar = _tiny_run(tmp_path / "cifar", load_encoder("random:demo"))
    for fmt in ("torchvision", "timm"):
        out = tmp_path / f"{fmt}.safetensors"
        with pytest.raises(SpecError, match=r"CIFAR-stem resnet18 \(3x3 conv1.*--format safetensors"):
            genaf.export(cifar, fmt, out)
        assert not out.exists()
    vit = _tiny_run(tmp_path / "vit", load_encoder("random:vit-tiny"))
    with pytest.raises(SpecError, match="vit-tiny, not a torchvision ResNet.*--format safetensors"):
        genaf.export(vit, "torchvision", tmp_path / "v.safetensors")
    with pytest.raises(SpecError, match="genaf's own vit-tiny, not a timm model"):
        genaf.export(vit, "timm", tmp_path / "v.safetensors")
    # what is refused as torchvision still exports as genaf's own file, and round-trips
    res = genaf.export(vit, "safetensors", tmp_path / "vit.safetensors")
    assert res["verified"] and res["max_abs_diff"] <= ATOL
    # a torchvision-shaped ResNet normalised with CIFAR statistics would compute other features there
    meta = {"arch": "resnet18", "width": 64, "stem": "imagenet", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    odd = _tiny_run(tmp_path / "odd", Encoder(ResNetBackbone("resnet18"), meta))
    with pytest.raises(SpecError, match="normalises with mean .* but torchvision:resnet18:PATH uses ImageNet"):
        genaf.export(odd, "torchvision", tmp_path / "o.safetensors")


def test_bad_format_name_and_out(tv_run, tmp_path):
    run, _ = tv_run
    with pytest.raises(SpecError, match="unknown export format 'onnx'.*safetensors, timm, torchvision"):
        genaf.export(run, "onnx", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match=r"\.safetensors .* or \.pth"):
        genaf.export(run, "torchvision", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="is a file of the run itself"):
        genaf.export(run, "torchvision", run / "model.safetensors")
    assert load_model(run) is not None  # the run's own weights are intact


def test_a_file_that_computes_other_features_is_removed(tv_run, tmp_path, monkeypatch):
    run, _ = tv_run
    import genaf.encoders

    real = genaf.encoders.load_encoder

    def other(spec):  # what a wrong key mapping would give: another network
        enc = real(spec)
        with torch.no_grad():
            enc.backbone.conv1.weight.mul_(1.5)
        return enc

    monkeypatch.setattr(genaf.encoders, "load_encoder", other)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError, match="computes other features.*removed"):
        genaf.export(run, "torchvision", out)
    assert not out.exists()


def test_cli_export_prints_the_spec_and_refuses_in_one_line(tv_run, tmp_path, capsys):
    run, _ = tv_run
    out = tmp_path / "cli.safetensors"
    assert main(["export", str(run), "--format", "torchvision", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"load it with torchvision:resnet18:{out}" in text and "features equal" in text and "head" in text
    cifar = _tiny_run(tmp_path / "cifar", load_encoder("random:demo"))
    assert main(["export", str(cifar), "--format", "torchvision", "--out", str(tmp_path / "c.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "genaf export: error:" in err and "--format safetensors" in err


def test_a_timm_run_exports_with_its_pooling(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    start = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(start))
    run = _tiny_run(tmp_path / "run", load_encoder(f"timm:vit_tiny_patch16_224:{start}?pool=mean"))
    out = tmp_path / "t.safetensors"
    res = genaf.export(run, "timm", out)
    assert res["load_with"] == f"timm:vit_tiny_patch16_224:{out}?pool=mean"  # not the model's default cls token
    x = _images(2, 32)
    want = _features(load_model(run).encoder, x)
    torch.testing.assert_close(_features(load_encoder(res["load_with"]), x), want, atol=ATOL, rtol=0)
    with pytest.raises(SpecError, match=r"a timm model \(vit_tiny_patch16_224\), not a torchvision ResNet"):
        genaf.export(run, "torchvision", tmp_path / "tv.safetensors")
