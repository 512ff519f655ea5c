"""Every registered method and every registered attack, on every kind of encoder genaf supports.

The test iterates the registries (``genaf.methods.base.method_names()``,
``genaf.attacks.base.attack_names()``): a new entry is run here the moment it is registered. Each
runs on a tiny random-weight encoder written to a local file by :data:`ENCODERS`' factory, on
16-pixel images of the packaged Fashion-MNIST subset (no network, no system dataset), with its
budget cut to one step (:data:`TINY_METHOD`, :data:`TINY_ATTACK`: each key is applied where the
entry has that option).

The families: genaf's ResNet and ViT, timm's ViT and ConvNeXt, a Hugging Face ViT. To add one,
add ``ENCODERS[name] = factory`` where ``factory(folder) -> spec`` writes a tiny random-weight
encoder there and returns its spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from _tiny import tiny_resnet, tiny_vit
from genaf import api
from genaf.attacks.base import _ATTACKS, attack_names
from genaf.data import load_dataset
from genaf.encoders import load_encoder
from genaf.methods.base import create_method, method_names
from genaf.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # image side: a multiple of the ViT's 4-pixel patch, not its 28-pixel training size
# Encoders that need more: ConvNeXt downsamples 32x (a 4x stem and three 2x stages), so 32 px.
SIZES = {"timm-convnext": 32}


def _timm_file(folder: Path, name: str) -> str:
    """timm's model ``name`` with seeded random weights, saved as safetensors; its ``timm:`` spec."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=0)
    path = folder / f"timm-{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"timm:{name}:{path}"


def tiny_timm_vit(folder: Path) -> str:
    """timm's own ``test_vit`` (6 blocks, width 64, patch 16: one patch token at 16 px), random
    weights saved as safetensors and read back through the ``timm:`` scheme."""
    return _timm_file(folder, "test_vit")


def tiny_hf_vit(folder: Path) -> str:
    """A Hugging Face ``ViTModel`` folder (width 32, 2 layers, patch 4, 16 px), read through ``hf:``."""
    transformers = pytest.importorskip("transformers")
    import json

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        size = {"patch_size": 4, "image_size": 16}
        cfg = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **size
        )
        model = transformers.ViTModel(cfg).eval()
    target = folder / "hf-vit"
    model.save_pretrained(str(target))
    prep = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "crop_size": {"height": 16, "width": 16}}
    (target / "preprocessor_config.json").write_text(json.dumps(prep))
    return f"hf:{target}"


def tiny_timm_convnext(folder: Path) -> str:
    """timm's own ``test_convnext`` (a ConvNeXt-style CNN: LayerNorm, depthwise convolutions, stages),
    random weights saved as safetensors and read back through the ``timm:`` scheme."""
    return _timm_file(folder, "test_convnext")


ENCODERS: dict[str, Callable[[Path], str]] = {
    "resnet": tiny_resnet,
    "timm-convnext": tiny_timm_convnext,
    "vit": tiny_vit,
    "timm-vit": tiny_timm_vit,
    "hf-vit": tiny_hf_vit,
}

# Options cut to the smallest useful budget, wherever an entry has them.
TINY_METHOD = {
    "epochs": 1,
    "warmup_epochs": 0,
    "attack_steps": 1,
    "guard_size": 16,
    "guard_steps": 1,
    "guard_fallback_steps": 1,
    "stage2_epochs": 1,
    "stage2_k": 2,
    "probe_size": 16,
    "sensitivity_steps": 1,
    "rift_epochs": 1,
    "rift_decay_epoch": 0,
    "probe_epochs": 1,
}
TINY_TRAIN = {"batch_size": 16, "eval_batch_size": 64, "n_val_robust": 8, "val_steps": 1, "augment": False}
TINY_ATTACK = {
    "iterations": 2,
    "epochs": 1,
    "steps": 2,
    "batch_size": 16,
    "max_passes": 1,
    "images": 16,
    "deepfool_iters": 2,
    "head_images": 32,
    "head_classes": 3,
    "halve_every": 1,
    "resample_every": 1,
}
# Registry entries this test may leave out, each with its reason. Keep it (nearly) empty.
SKIP: dict[str, str] = {}


def test_skip_list_is_small_and_names_real_entries():
    assert len(SKIP) <= 2
    assert set(SKIP) <= set(method_names()) | set(attack_names())


@pytest.fixture(scope="module")
def datasets():
    """The tiny split at each encoder's image size (made once per size)."""
    made: dict[int, object] = {}

    def get(encoder: str):
        size = SIZES.get(encoder, SIZE)
        if size not in made:
            made[size] = load_dataset("fashion-mnist-demo", image_size=size, n_train=32, n_val=16, n_test=32, seed=0)
        return made[size]

    return get


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    return {name: _Lazy(factory, folder) for name, factory in ENCODERS.items()}


class _Lazy:
    """An encoder spec written on first use (a factory whose optional extra is missing skips only
    the tests of that encoder)."""

    def __init__(self, factory, folder: Path) -> None:
        self.factory, self.folder, self.spec = factory, folder, None

    def __str__(self) -> str:
        if self.spec is None:
            self.spec = self.factory(self.folder)
        return self.spec


def _tiny(options: dict, tiny: dict) -> dict:
    return {k: v for k, v in tiny.items() if k in options}


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("method", [m for m in method_names() if m not in SKIP])
def test_every_method_runs(tmp_path, datasets, specs, encoder, method):
    data = datasets(encoder)
    mc = _tiny(create_method(method).cfg, TINY_METHOD)
    out = tmp_path / "run"
    m = api.finetune(
        str(specs[encoder]),
        "fashion-mnist-demo",
        method,
        out,
        method_config=mc,
        train=dict(TINY_TRAIN),
        data={"n_train": 32, "n_val": 16, "n_test": 32, "image_size": SIZES.get(encoder, SIZE)},
        datamodule=data,
        log=lambda *_: None,
    )
    assert 0 <= m["clean_acc"] <= 1 and all(0 <= v <= 1 for v in m["robust_acc"].values())
    model = load_model(out)
    assert model.encoder.arch == load_encoder(str(specs[encoder])).arch
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    logits = model(data.test.float_images()[:4])
    assert logits.shape == (4, data.num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("attack", [a for a in attack_names() if a not in SKIP])
def test_every_attack_runs(datasets, specs, encoder, attack):
    data = datasets(encoder)
    size = SIZES.get(encoder, SIZE)
    enc = load_encoder(str(specs[encoder]))
    cls = _ATTACKS[attack]
    preset = cls.presets["cpu"]
    over = _tiny(preset, TINY_ATTACK)
    sur = data.surrogate(32)
    x = sur.float_images()[:8]
    if hasattr(cls, "fit"):
        pert = api.craft(enc, attack, sur, eps=preset["eps"], device="cpu", **over)
        assert tuple(pert.delta.shape[-2:]) == (size, size)
        assert torch.isfinite(pert.delta).all()
        x_adv = pert.apply(x)
        if pert.kind == "additive":
            assert float((x_adv - x).abs().max()) <= pert.eps + 1e-6
    else:
        fn, _ = api.craft_per_sample(enc, attack, device="cpu", **over)
        x_adv = fn(x)
        assert float((x_adv - x).abs().max()) <= preset["eps"] + 1e-6
    assert x_adv.shape == x.shape and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        f0, f1 = enc(x), enc(x_adv)
    assert torch.isfinite(f1).all()
    assert not torch.equal(f0, f1), f"{attack} left the {encoder} encoder's features unchanged"
    assert math.isfinite(float((f1 - f0).norm()))
