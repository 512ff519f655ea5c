"""torchvision:ARCH:PATH — torchvision ResNet weights load strictly as ImageNet-normalised encoders."""

from __future__ import annotations

import pytest
import torch
from enc_helpers import IMAGENET_MEAN, IMAGENET_STD, images, normalize
from safetensors.torch import save_file
from torch import nn

from genaf.encoders import load_encoder
from genaf.encoders.tv import load_torchvision_encoder
from genaf.errors import CheckpointError, SpecError


def _reference(model: nn.Module) -> nn.Module:
    ref = nn.Sequential(*list(model.children())[:-1], nn.Flatten())  # torchvision resnet, fc dropped
    return ref.eval()


def _check_matches(enc, model):
    assert not enc.training
    assert enc.arch == "resnet18" and enc.feature_dim == 512 and enc.input_size == 224
    assert enc.mean == pytest.approx(IMAGENET_MEAN) and enc.std == pytest.approx(IMAGENET_STD)
    assert enc.backbone.conv1.kernel_size == (7, 7) and enc.backbone.conv1.padding == (3, 3)
    x = images(2, 32, seed=7)
    with torch.no_grad():
        ours = enc(x)
        fc = model.fc
        try:
            model.fc = nn.Identity()
            ref = model(normalize(x, IMAGENET_MEAN, IMAGENET_STD))
        finally:
            model.fc = fc
    assert torch.allclose(ours, ref, atol=1e-5)


def test_torch_saved_state_dict(tmp_path, imagenet_tv_model):
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_tv_model.state_dict(), path)
    enc = load_encoder(f"torchvision:resnet18:{path}")
    _check_matches(enc, imagenet_tv_model)
    assert enc.meta["source"] == f"torchvision:resnet18:{path}"


def test_safetensors_state_dict(tmp_path, imagenet_tv_model):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet_tv_model.state_dict().items()}, str(path))
    _check_matches(load_torchvision_encoder("resnet18", path), imagenet_tv_model)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_wrapped_and_dataparallel_state_dicts(tmp_path, imagenet_tv_model, wrap):
    sd = {f"module.{k}": v for k, v in imagenet_tv_model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({wrap: sd, "epoch": 90, "best_acc1": 69.7}, path)
    _check_matches(load_torchvision_encoder("resnet18", path), imagenet_tv_model)


def test_unknown_arch_lists_supported():
    with pytest.raises(SpecError) as err:
        load_encoder("torchvision:resnet181:/nowhere.pth")
    msg = str(err.value)
    assert "resnet181" in msg and "resnet18, resnet34, resnet50" in msg and "did you mean 'resnet18'" in msg


def test_wrong_arch_and_missing_file(tmp_path, imagenet_tv_model):
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_tv_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="the weights are a resnet18, not a resnet34"):
        load_encoder(f"torchvision:resnet34:{path}")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(f"torchvision:resnet18:{tmp_path / 'missing.pth'}")


def test_cifar_stem_weights_point_to_solo(tmp_path, cifar_tv_model):
    path = tmp_path / "cifar.pth"
    torch.save(cifar_tv_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="3x3 kernel.*solo:PATH"):
        load_encoder(f"torchvision:resnet18:{path}")


def test_strict_loading_reports_mismatches(tmp_path, imagenet_tv_model):
    sd = dict(imagenet_tv_model.state_dict())
    del sd["layer4.1.bn2.running_var"]
    sd["layer4.1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"torchvision:resnet18:{path}")
    msg = str(err.value)
    assert "missing keys (1): layer4.1.bn2.running_var" in msg and "unexpected keys (1): layer4.1.extra.weight" in msg


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_encoder(f"torchvision:resnet18:{path}")


def test_provenance_not_guessed_and_native_size_warning(tmp_path, imagenet_tv_model):
    """A torchvision-format file does not say how it was trained: inspect says 'unknown' (random
    weights are not 'supervised, imagenet'); running the 224 px ImageNet stem on 28 px images
    warns with the native size and the flag that resizes, while 224 px and the demo's 28 px
    encoder at 28 px do not."""
    import warnings

    from genaf.encoders.base import SizeWarning, warn_native_size

    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_tv_model.state_dict(), path)
    enc = load_encoder(f"torchvision:resnet18:{path}")
    info = enc.describe()
    assert info["method"] == "unknown" and info["pretrain_dataset"] == "unknown"
    with pytest.warns(SizeWarning, match=r"pre-trained at 224 px but runs on 28x28 px.*--image-size 224"):
        warn_native_size(enc.meta, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_native_size(enc.meta, 224) is None and warn_native_size(enc.meta, (96, 96)) is None
        assert warn_native_size(load_encoder("demo").meta, (28, 28)) is None
