"""timm:NAME[:PATH] and hf:DIR encoders, offline, on random-weight models in the real
architectures that the tests save to local files.

The timm ViT is the real ``vit_small_patch14_dinov2.lvd142m`` (22M parameters, 518-pixel
position grid); the others are timm's tiny test models (``test_vit``, ``test_convnext``) and tiny
Hugging Face configs (hidden 32, 2 layers, patch 4, image 16) saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from genaf.cli import main
from genaf.encoders import file_sha256, load_encoder, save_encoder
from genaf.errors import CheckpointError, SpecError

PREP = {
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "crop_size": {"height": 16, "width": 16},
}
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16
)
FIELDS = (
    "arch",
    "num_parameters",
    "feature_dim",
    "pool",
    "input_size",
    "patch_size",
    "mean",
    "std",
    "keys",
    "source_files",
)


def _timm_file(folder, name, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _hf_dir(folder, model, prep=PREP):
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(prep))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every model once per module: {key: (library model, spec)}."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    vits = {"dynamic_img_size": True}  # the library model itself runs at any multiple of the patch
    for key, name, kw in (
        ("dinov2", "vit_small_patch14_dinov2.lvd142m", vits),
        ("vit", "test_vit", vits),
        ("convnext", "test_convnext", {}),
    ):
        model, path = _timm_file(root, name, **kw)
        out[f"timm-{key}"] = (model, f"timm:{name}:{path}")
    torch.manual_seed(1)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).eval()
    out["hf-dinov2"] = (dino, f"hf:{_hf_dir(root / 'dinov2', dino)}")
    torch.manual_seed(2)
    reg = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4))
    out["hf-dinov2-reg"] = (reg.eval(), f"hf:{_hf_dir(root / 'dinov2reg', reg)}")
    torch.manual_seed(5)
    v3 = transformers.AutoModel.from_config(transformers.CONFIG_MAPPING["dinov3_vit"](**TINY, num_register_tokens=4))
    out["hf-dinov3"] = (v3.eval(), f"hf:{_hf_dir(root / 'dinov3', v3)}")
    torch.manual_seed(3)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16)
    ).eval()
    out["hf-clip"] = (clip, f"hf:{_hf_dir(root / 'clip', clip)}")
    torch.manual_seed(4)
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY)).eval()
    out["hf-vit"] = (vit, f"hf:{_hf_dir(root / 'vit', vit)}")
    return out


def _norm(x, enc):
    return (x - torch.tensor(enc.mean).view(1, -1, 1, 1)) / torch.tensor(enc.std).view(1, -1, 1, 1)


@pytest.mark.parametrize(
    "key, arch, pool, patch, dim",
    [
        ("timm-dinov2", "vit_small_patch14_dinov2.lvd142m", "cls", 14, 384),
        ("timm-convnext", "test_convnext", "mean", None, 64),
        ("hf-dinov2", "Dinov2Model", "cls", 4, 32),
        ("hf-clip", "CLIPVisionModel", "pooler", 4, 32),
    ],
)
def test_inspect_prints_every_field(files, capsys, key, arch, pool, patch, dim):
    model, spec = files[key]
    assert main(["inspect", spec, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(FIELDS) <= set(info)
    assert (info["arch"], info["pool"], info["patch_size"], info["feature_dim"]) == (arch, pool, patch, dim)
    tower = model.vision_model if key == "hf-clip" else model  # CLIP: the vision tower only
    assert info["num_parameters"] == sum(p.numel() for p in tower.parameters())
    assert info["keys"]["missing"] == [] and info["keys"]["loaded"] > 0
    assert info["source_files"] and all(len(f["sha256"]) == 64 for f in info["source_files"])
    if key.startswith("hf"):
        assert info["mean"] == PREP["image_mean"] and info["interpolation"] == "bicubic"
    if key == "hf-clip":  # the text tower is reported as unexpected, not silently dropped
        assert any(k.startswith("text_model.") for k in info["keys"]["unexpected"])
    if key == "timm-dinov2":
        assert info["input_size"] == 518 and info["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert main(["inspect", spec]) == 0
    text = capsys.readouterr().out
    for field in FIELDS:
        assert f"{field}:" in text
    assert "loaded " in text and "missing 0" in text


def test_features_equal_the_library_forward(files):
    x = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    x16 = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))  # not the native 16: interpolated
    with torch.no_grad():
        model, spec = files["timm-dinov2"]
        enc = load_encoder(spec)
        tokens = model.forward_features(_norm(x, enc))  # the library model at 28 px (dynamic size)
        assert torch.allclose(enc(x), tokens[:, 0], atol=1e-5)  # CLS after the final norm
        enc_mean = load_encoder(spec + "?pool=mean")
        assert enc_mean.meta["pool"] == "mean" and enc_mean.meta["num_prefix_tokens"] == 1
        assert torch.allclose(enc_mean(x), tokens[:, 1:].mean(1), atol=1e-5)

        model, spec = files["timm-convnext"]
        enc = load_encoder(spec)
        x32 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # it downsamples by 32
        assert torch.allclose(enc(x32), model(_norm(x32, enc)), atol=1e-5)

        model, spec = files["hf-dinov2"]
        enc = load_encoder(spec)
        assert torch.allclose(enc(x16), model(pixel_values=_norm(x16, enc)).last_hidden_state[:, 0], atol=1e-5)

        model, spec = files["hf-dinov2-reg"]  # 4 register tokens: never pooled as patches
        enc = load_encoder(spec + "?pool=mean")
        h = model(pixel_values=_norm(x16, enc)).last_hidden_state
        assert enc.meta["num_register_tokens"] == 4 and h.shape[1] == 1 + 4 + 36
        assert torch.allclose(enc(x16), h[:, 5:].mean(1), atol=1e-5)
        assert not torch.allclose(enc(x16), h[:, 1:].mean(1), atol=1e-4)

        model, spec = files["hf-dinov3"]  # rotary position embeddings, 4 registers
        h = model(pixel_values=_norm(x16, enc)).last_hidden_state
        assert torch.allclose(load_encoder(spec)(x16), h[:, 0], atol=1e-5)
        assert torch.allclose(load_encoder(spec + "?pool=mean")(x16), h[:, 5:].mean(1), atol=1e-5)

        model, spec = files["hf-clip"]
        enc = load_encoder(spec)
        out = model.vision_model(pixel_values=_norm(x16, enc), interpolate_pos_encoding=True)
        assert torch.allclose(enc(x16), out.pooler_output, atol=1e-5)  # post-layernormed CLS
        assert torch.allclose(load_encoder(spec + "?pool=cls")(x16), out.last_hidden_state[:, 0], atol=1e-5)


def test_layer_names_are_the_librarys(files):
    enc = load_encoder(files["timm-vit"][1])
    assert "blocks.1" in enc.layer_names() and "blocks.1.attn.qkv" in enc.weight_layer_names()
    assert isinstance(enc.get_layer("blocks.1.mlp.fc1"), torch.nn.Linear)
    enc = load_encoder(files["hf-dinov2"][1])
    assert "encoder.layer.1" in enc.layer_names()
    assert isinstance(enc.get_layer("encoder.layer.1"), type(files["hf-dinov2"][0].encoder.layer[1]))


def test_encoder_file_round_trip(files, tmp_path):
    """A timm or HF encoder saved as a genaf file (what a run writes) rebuilds to the same features."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for key, opt in (("timm-vit", ""), ("timm-vit", "?pool=mean"), ("hf-clip", "?pool=mean"), ("hf-vit", "")):
        enc = load_encoder(files[key][1] + opt)
        path = tmp_path / f"{key}{opt[6:]}.safetensors"
        save_encoder(enc, path)
        again = load_encoder(f"file:{path}")
        assert again.meta["pool"] == enc.meta["pool"]
        with torch.no_grad():
            assert torch.allclose(again(x), enc(x), atol=1e-6)


def test_size_not_a_multiple_of_the_patch_is_refused(files, capsys):
    enc = load_encoder(files["timm-dinov2"][1])
    with pytest.raises(SpecError, match="use 28 or 42"):
        enc(torch.rand(1, 3, 30, 30))
    spec = files["hf-dinov2"][1]
    args = ["finetune", "--encoder", spec, "--method", "sft", "--out", "unused", "--image-size", "30"]
    args += ["--n-train", "16", "--n-val", "16", "--n-test", "16", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a multiple of the patch size 4" in err and "use 28 or 32" in err


@pytest.mark.parametrize("module, spec, extra", [("timm", "timm:test_vit", "timm"), ("transformers", "hf:x", "hf")])
def test_missing_extra_names_the_install(monkeypatch, capsys, module, spec, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pip install 'genaf[{extra}]'" in err


def test_refusals(files, tmp_path, capsys):
    remote = _hf_dir(tmp_path / "remote", files["hf-vit"][0])
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    assert main(["inspect", f"hf:{remote}"]) == 2
    assert "remote code" in capsys.readouterr().err
    with pytest.raises(SpecError, match="no class token"):
        load_encoder(files["timm-convnext"][1] + "?pool=cls")
    with pytest.raises(SpecError, match="unknown pool"):
        load_encoder(files["hf-dinov2"][1] + "?pool=max")
    with pytest.raises(SpecError, match="unknown encoder option"):
        load_encoder(files["hf-dinov2"][1] + "?pooling=cls")
    noprep = _hf_dir(tmp_path / "noprep", files["hf-vit"][0])
    (noprep / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json is missing"):
        load_encoder(f"hf:{noprep}")
    wrong = tmp_path / "wrong.safetensors"  # a ConvNeXt's weights under a ViT's name
    save_file({k: v.contiguous() for k, v in files["timm-convnext"][0].state_dict().items()}, str(wrong))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_encoder(f"timm:test_vit:{wrong}")


def test_encoders_zoo_lists_sources_and_no_invented_hash(capsys):
    assert main(["encoders", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = " ".join(r["name"] for r in rows)
    for needle in ("solo-learn", "CIFAR-10", "ImageNet-100", "DINO ViT", "DINOv2", "MAE", "CLIP"):
        assert needle in names
    for r in rows:
        assert r["source"].startswith("https://") and r["spec"].split(":")[0] in ("solo", "torchvision", "timm", "hf")
        assert r["sha256"].startswith("not published")  # no source publishes a full sha256 of these files
    for r in rows:  # every timm name in the zoo is one timm knows
        for part in r["spec"].split():
            if part.startswith("timm:"):
                assert timm.is_model(part[5:].split("[")[0]), part


@pytest.mark.parametrize("key, layer", [("timm-vit", "blocks.0"), ("hf-vit", "layers.0")])
def test_finetune_attack_evaluate(files, tmp_path, capsys, key, layer):
    """One tiny SFT run, a universal attack on a transformer block and an evaluation, end to end;
    the run records the encoder file's sha256 and rebuilds its model for the evaluation."""
    spec = files[key][1]
    run = tmp_path / "run"
    tiny = ["--n-train", "48", "--n-val", "32", "--n-test", "32", "--image-size", "32", "--device", "cpu"]
    assert main(["finetune", "--encoder", spec, "--method", "sft", "--epochs", "1", "--out", str(run)] + tiny) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    weights = spec.split(":")[-1] if key.startswith("timm") else spec[3:] + "/model.safetensors"
    recorded = {f["path"]: f["sha256"] for f in metrics["encoder_files"]}
    assert recorded[weights] == file_sha256(weights)
    assert "encoder_files" in (run / "config.yaml").read_text()
    pert = tmp_path / "l4a.safetensors"
    craft = ["attack", "--encoder", spec, "--attack", "l4a-base", "--eps", "16/255", "--n-surrogate", "16"]
    craft += ["--image-size", "32", "--set", "iterations=2", "--set", f"layer={layer}", "--out", str(pert)]
    assert main(craft + ["--device", "cpu", "--n-train", "48", "--n-val", "32"]) == 0
    clean = metrics["clean_acc"]
    assert main(["evaluate", "--model", str(run), "--perturbation", str(pert), "--device", "cpu"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["clean_acc"] == clean  # the rebuilt model predicts as the trained one did
    assert 0.0 <= after["robust_acc"]["l4a"] <= 1.0
    capsys.readouterr()


def test_resume_refuses_a_changed_encoder_file(tmp_path):
    from genaf.api import check_same_encoder_files

    saved = {"encoder_files": [{"path": "/w.safetensors", "sha256": "a" * 64}]}
    check_same_encoder_files(saved, {"encoder_files": [{"path": "/w.safetensors", "sha256": "a" * 64}]}, tmp_path)
    with pytest.raises(CheckpointError, match="changed since the run started") as e:
        check_same_encoder_files(saved, {"encoder_files": [{"path": "/w.safetensors", "sha256": "b" * 64}]}, tmp_path)
    assert "a" * 64 in str(e.value) and "b" * 64 in str(e.value)


def test_pth_through_the_safe_reader(files, tmp_path):
    """A wrapped torch.save checkpoint in the original layout (an extra mask_token, a classifier
    head): read without unpickling code, converted by timm's filter, the head reported."""
    model = files["timm-vit"][0]
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    state["head.weight"], state["head.bias"] = torch.zeros(10, model.embed_dim), torch.zeros(10)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "epoch": 3}, path)
    enc = load_encoder(f"timm:test_vit:{path}")
    assert enc.meta["keys"]["unexpected"] == ["head.weight", "head.bias"]
    assert "checkpoint_filter_fn" in enc.meta["keys"]["note"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(enc(x), model(_norm(x, enc)), atol=1e-5)
