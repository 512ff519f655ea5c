"""genaf's own ViT: architecture, files, sizes, and the layers attacks and stage 2 find on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genaf.attacks.base import LayerTap, create_attack
from genaf.attacks.fff import default_layers
from genaf.attacks.layer_select import candidates_for, low_layer_candidates
from genaf.cli import main
from genaf.encoders import load_encoder, save_encoder
from genaf.encoders.layout import block_names, is_transformer
from genaf.encoders.vit import ViTBackbone, nearest_valid_sizes
from genaf.errors import SpecError
from genaf.methods.sensitivity import weight_units


@pytest.fixture(scope="module")
def vit():
    return load_encoder("random:vit-tiny")


def test_vit_tiny_shape_and_timm_names(vit):
    n = sum(p.numel() for p in vit.parameters())
    assert 200_000 < n < 1_000_000 and n * 4 < 4 * 2**20  # a few hundred thousand, under 4 MB
    names = set(vit.layer_names())
    for want in (
        "patch_embed.proj",
        "blocks.0.norm1",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.norm2",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.3",
        "norm",
    ):
        assert want in names, want
    state = vit.backbone.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 7 * 7, 96) and state["cls_token"].shape == (1, 1, 96)
    assert vit.feature_dim == 96 and vit(torch.rand(2, 3, 28, 28)).shape == (2, 96)
    # seeded: the same random weights every time
    again = load_encoder("random:vit-tiny")
    assert all(torch.equal(v, again.backbone.state_dict()[k]) for k, v in state.items())


def test_position_embedding_interpolates_and_sizes_are_checked(vit):
    bb = vit.backbone
    assert bb.position_embedding(7, 7) is bb.pos_embed
    pe = bb.position_embedding(4, 4)
    assert pe.shape == (1, 17, 96) and torch.equal(pe[:, 0], bb.pos_embed[:, 0])
    for side in (16, 32):
        assert vit(torch.rand(1, 3, side, side)).shape == (1, 96)
    with pytest.raises(SpecError, match=r"multiple of its patch size 4, got 30x30; use 28 or 32"):
        vit(torch.rand(1, 3, 30, 30))
    assert nearest_valid_sizes(30, 4) == [28, 32] and nearest_valid_sizes(2, 4) == [4]
    with pytest.raises(SpecError, match="use 28 or 32"):
        ViTBackbone("vit-tiny", input_size=30)
    with pytest.raises(SpecError, match="unknown ViT arch"):
        ViTBackbone("vit-huge")


def test_cli_refuses_a_size_that_is_not_a_patch_multiple(tmp_path, capsys):
    rc = main(["pretrain", "--arch", "vit-tiny", "--image-size", "30", "--out", str(tmp_path / "e.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "patch size 4" in err and "28 or 32" in err
    assert not (tmp_path / "e.safetensors").exists()
    # fine-tuning: refused once the data's size is known, before anything is written in the run folder
    args = ["finetune", "--encoder", "random:vit-tiny", "--dataset", "fashion-mnist-demo", "--method", "sft"]
    rc = main(args + ["--image-size", "30", "--n-train", "32", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "use 28 or 32" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_vit_encoder_files_round_trip(tmp_path, suffix):
    from genaf.encoders import Encoder
    from genaf.encoders.demo import DEMO_META_VIT
    from genaf.encoders.resnet import build_backbone

    meta = dict(DEMO_META_VIT, embed_dim=32, depth=2, num_heads=2, pool="mean")
    torch.manual_seed(3)
    enc = Encoder(build_backbone(meta), meta).eval()
    path = tmp_path / f"vit{suffix}"
    save_encoder(enc, path)
    back = load_encoder(f"file:{path}")
    assert back.arch == "vit-tiny" and back.meta["embed_dim"] == 32 and back.meta["pool"] == "mean"
    x = torch.rand(3, 3, 28, 28)
    assert torch.equal(enc(x), back(x))


def test_layer_aliases_tap_the_blocks(vit):
    assert vit.layer_aliases() == {
        "relu": "patch_embed.proj",
        "layer1": "blocks.0",
        "layer2": "blocks.1",
        "layer3": "blocks.2",
        "layer4": "blocks.3",
    }
    x = torch.rand(2, 3, 28, 28)
    seen = {}
    h = vit.get_layer("blocks.1").register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        out = LayerTap(vit, ["layer2"])(x)["layer2"]
    h.remove()
    assert out.shape == (2, 50, 96) and torch.equal(out, seen["o"])
    # a ResNet keeps its own names and gets no aliases
    assert load_encoder("random:demo").layer_aliases() == {}
    with pytest.raises(SpecError, match="no layer 'layer9'"):
        vit.get_layer("layer9")


def test_auto_layer_candidates_and_fff_layers_on_a_vit(vit):
    assert is_transformer(vit.backbone) and not is_transformer(load_encoder("random:demo").backbone)
    assert block_names(vit.backbone) == [f"blocks.{i}" for i in range(4)]
    assert low_layer_candidates(vit) == ["patch_embed.proj", "blocks.0", "blocks.1"]
    # l4a-fuse's fixed layer is the stem ('relu' = patch_embed.proj): auto never picks it again
    fuse = create_attack("l4a-fuse", vit)
    assert candidates_for(fuse, "layer2") == ["blocks.0", "blocks.1"]
    assert default_layers(vit) == ["patch_embed.proj"] + [f"blocks.{i}" for i in range(4)]
    assert low_layer_candidates(load_encoder("random:demo"))[0] == "relu"


def test_stage2_units_on_a_vit(vit):
    units = weight_units(vit.backbone)
    per_block = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert set(units) == {"patch_embed.proj"} | {f"blocks.{i}.{u}" for i in range(4) for u in per_block}
    assert all(isinstance(vit.backbone.get_submodule(n), (nn.Linear, nn.Conv2d)) for n in units)


def test_vit_pretrain_end_to_end_through_the_cli(tmp_path, capsys):
    """`genaf pretrain --arch vit-tiny --dataset fashion-mnist --method simclr` on a tiny budget
    (the packaged subset's 28-px images when the system files are absent)."""
    from pathlib import Path

    dataset = "fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "fashion-mnist-demo"
    out = tmp_path / "vit.safetensors"
    args = ["pretrain", "--arch", "vit-tiny", "--dataset", dataset, "--method", "simclr", "--epochs", "1"]
    args += ["--n-images", "64", "--batch-size", "32", "--n-test", "64", "--out", str(out)]
    assert main(args) == 0
    enc = load_encoder(f"file:{out}")
    assert enc.arch == "vit-tiny" and enc.meta["method"] == "simclr" and enc.meta["pretrain_epochs"] == 1
    rand = load_encoder("random:vit-tiny")
    assert any(not torch.equal(v, rand.backbone.state_dict()[k]) for k, v in enc.backbone.state_dict().items())
    assert '"knn_acc"' in capsys.readouterr().out


def test_a_perturbation_records_the_module_an_alias_named(vit):
    from genaf.data import load_dataset

    sur = load_dataset("fashion-mnist-demo", n_train=32, n_val=16, n_test=16).surrogate(16)
    pert = create_attack("std", vit, iterations=1, batch_size=8).fit(sur)
    assert pert.config["layer"] == "layer2" and pert.config["layer_modules"] == {"layer2": "blocks.1"}
    res = create_attack("std", load_encoder("random:demo"), iterations=1, batch_size=8).fit(sur)
    assert "layer_modules" not in res.config  # a ResNet's own name


def test_layout_is_found_by_type_on_timm_and_hugging_face_backbones():
    """The same rules name the layers of other libraries' models (built here, random weights)."""
    from genaf.encoders.layout import layer_aliases, low_layers

    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    assert layer_aliases(vit) == {
        "relu": "patch_embed.proj",
        "layer1": "blocks.2",
        "layer2": "blocks.5",
        "layer3": "blocks.8",
        "layer4": "blocks.11",
    }
    assert is_transformer(vit) and low_layers(vit) == ["patch_embed.proj"] + [f"blocks.{i}" for i in range(6)]
    cnx = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    assert layer_aliases(cnx) == {"relu": "stem", **{f"layer{k}": f"stages.{k - 1}" for k in range(1, 5)}}
    assert not is_transformer(cnx) and low_layers(cnx)[:2] == ["stem", "stages.0.blocks.0"]
    res = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert layer_aliases(res) == {"relu": "act1"} and low_layers(res)[:2] == ["act1", "layer1.0"]
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=4
    )
    dino = transformers.Dinov2Model(cfg)
    assert layer_aliases(dino)["relu"] == "embeddings.patch_embeddings.projection"
    assert layer_aliases(dino)["layer2"] == "encoder.layer.1" and is_transformer(dino)


def test_shipped_demo_vit_loads_and_is_pretrained(capsys):
    """`demo-vit`: the vit-tiny pre-trained with SimCLR on Fashion-MNIST ships in the package; its
    features separate two classes better than the same architecture with random weights (a cheap
    stand-in for benchmarks/encoder_quality.py: nearest-class-mean accuracy on 200 test images)."""
    from genaf.data import load_dataset

    enc = load_encoder("demo-vit")
    assert enc.arch == "vit-tiny" and enc.meta["source"] == "demo-vit"
    assert enc.source_files and len(enc.source_files[0]["sha256"]) == 64
    data = load_dataset("fashion-mnist-demo", n_train=400, n_val=16, n_test=200, seed=0)

    def ncm(e):
        with torch.no_grad():
            tr = F.normalize(e(data.train.float_images()), dim=1)
            te = F.normalize(e(data.test.float_images()), dim=1)
        means = torch.stack([tr[data.train.labels == c].mean(0) for c in range(data.num_classes)])
        return float(((te @ means.t()).argmax(1) == data.test.labels).float().mean())

    assert ncm(enc) > ncm(load_encoder("random:vit-tiny")) + 0.05
    assert main(["inspect", "demo-vit"]) == 0
    assert "vit-tiny" in capsys.readouterr().out


def test_shipped_two_domain_vit_is_pretrained_on_both_domains():
    """`demo-vit-mix`: the same vit-tiny pre-trained on Fashion-MNIST and rendered digits together;
    on each domain its features separate the classes better than random weights (nearest class
    mean on 200 test images; docs/ENCODERS.md has the full k-NN and linear-probe figures)."""
    from genaf.data import load_dataset

    enc = load_encoder("demo-vit-mix")
    assert enc.arch == "vit-tiny" and enc.meta["source"] == "demo-vit-mix"
    assert enc.meta["pretrain_dataset"] == "fashion-mnist+rendered-digits"
    rand = load_encoder("random:vit-tiny")
    for name in ("fashion-mnist-demo", "rendered-digits"):
        data = load_dataset(name, n_train=400, n_val=16, n_test=200, seed=0)

        def ncm(e, data=data):
            with torch.no_grad():
                tr = F.normalize(e(data.train.float_images()), dim=1)
                te = F.normalize(e(data.test.float_images()), dim=1)
            means = torch.stack([tr[data.train.labels == c].mean(0) for c in range(data.num_classes)])
            return float(((te @ means.t()).argmax(1) == data.test.labels).float().mean())

        assert ncm(enc) > ncm(rand) + 0.05, name
