"""End-to-end: the demo (quick setting), pre-training, YAML configs, resume through the CLI."""

import json
import re

import pytest
import torch
import yaml

from genaf.cli import main
from genaf.encoders import load_encoder
from genaf.errors import ConfigError


@pytest.mark.slow
def test_quick_demo_writes_everything(tmp_path, tiny_data, monkeypatch):
    """The quick demo, on a machine without the Fashion-MNIST system package (the root is pointed
    at an empty folder): the data come from the package's own subset."""
    from genaf.demo import run_demo

    empty = tmp_path / "no-system-files"
    empty.mkdir()
    monkeypatch.delenv("GENAF_FASHION_MNIST", raising=False)
    monkeypatch.setenv("GENAF_SYSTEM_FASHION_MNIST", str(empty))
    out = tmp_path / "demo"
    results = run_demo(out, quick=True, device="cpu", log=lambda *_: None)
    # the three methods and SFT / AT again at Gen-AF's total budget (warm-up 1 + 1 + stage 2 1 = 3 epochs)
    assert set(results) == {"sft", "at", "genaf", "sft-budget", "at-budget"}
    budget = {m: r["budget"]["total_epochs"] for m, r in results.items()}
    assert budget == {"sft": 1, "at": 2, "genaf": 3, "sft-budget": 3, "at-budget": 3}
    for m in results:
        met = json.loads((out / m / "metrics.json").read_text())
        assert 0 <= met["clean_acc"] <= 1 and met["n_test"] == 64 and met["seed"] == 0
        assert {"l4a-base", "ssp-universal", "uniform-noise", "pgd10-wb"} <= set(met["robust_acc"])
        assert set(met["fooling_rate"]) == set(met["robust_acc"]) and "versions" in met
    for control, shorter in (("sft-budget", "sft"), ("at-budget", "at")):  # continued from the shorter run
        met = json.loads((out / control / "metrics.json").read_text())
        assert met["continued_from"]["run"] == str(out / shorter) and met["continued_from"]["epochs"] == 1
    report = (out / "report.md").read_text()
    assert "| genaf |" in report and "| at-budget |" in report and "16/255" in report
    assert "surrogate reserve" in report and "passes/img" in report
    assert "package data fashion-mnist-demo.npz.xz" in report
    assert (out / "genaf" / "sensitivity.json").is_file()
    assert (out / "perturbations" / "ssp-universal.delta.png").is_file()
    # the report shows its pictures: each perturbation with SFT's predictions, Gen-AF's sensitivity
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"perturbations/ssp-universal.examples.png", "perturbations/ssp-universal.delta.png"} <= set(links)
    assert "genaf/sensitivity.png" in links
    assert all((out / x).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for x in links)


def test_pretrain_writes_a_loadable_encoder(tmp_path, tiny_data):
    from genaf.encoders.demo import DEMO_META
    from genaf.encoders.files import save_encoder
    from genaf.pretrain import pretrain

    for method in ("simclr", "byol"):
        enc = pretrain(
            tiny_data.train, dict(DEMO_META, width=4), method=method, epochs=1, batch_size=64, log=lambda *_: None
        )
        path = tmp_path / f"{method}.safetensors"
        save_encoder(enc, path)
        again = load_encoder(f"file:{path}")
        x = tiny_data.test.float_images()[:4]
        assert torch.allclose(enc(x), again(x), atol=1e-6)
        assert again.meta["method"] == method


def test_pretraining_on_a_mix_of_two_domains(tmp_path, capsys):
    """--dataset a+b: an equal share of the images from each (shuffled together), the mix's own
    normalisation, and a probe per domain on its own test split."""
    from genaf.data import load_dataset
    from genaf.pretrain import image_stats, mix_train

    a, b = (load_dataset(n, n_train=40, n_val=8, n_test=8, seed=0).train for n in ("fashion-mnist", "rendered-digits"))
    mix = mix_train([a, b], seed=0)
    assert len(mix) == 80 and mix.dataset == "fashion-mnist+rendered-digits"
    assert sorted(map(bytes, mix.images.flatten(1).numpy())) == sorted(
        map(bytes, torch.cat([a.images, b.images]).flatten(1).numpy())
    )  # every image of both, once
    first = set(map(bytes, a.images.flatten(1).numpy()))
    where = [bytes(x) in first for x in mix.images.flatten(1).numpy()]
    assert 0 < sum(where[:40]) < 40  # shuffled together, not one block after the other
    mean, std = image_stats(mix)
    assert len(mean) == 3 and mean[0] != pytest.approx(image_stats(a)[0][0], abs=1e-3)

    out = tmp_path / "mix.safetensors"
    args = ["pretrain", "--dataset", "fashion-mnist+rendered-digits", "--n-images", "128", "--epochs", "1"]
    assert main([*args, "--batch-size", "32", "--n-test", "32", "--width", "4", "--out", str(out), "-q"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["per_dataset"]) == {"fashion-mnist", "rendered-digits"}
    assert all(r["n_train"] == 64 and r["n_test"] == 32 for r in rep["per_dataset"].values())
    meta = load_encoder(f"file:{out}").meta
    assert meta["pretrain_dataset"] == "fashion-mnist+rendered-digits" and meta["mean"][0] != 0.286
    assert main(["pretrain", "--dataset", "fashion-mnist+fashion-mnist", "--out", str(out)]) == 2
    assert "name each dataset once" in capsys.readouterr().err


def test_shipped_demo_encoder_beats_random_weights(tiny_data):
    from genaf.pretrain import linear_probe_accuracy

    # small split: a sanity check that the shipped weights are pre-trained, not the 5-point claim
    enc, rand = load_encoder("demo"), load_encoder("random:demo")
    assert enc.describe()["stem"]["padding"] == [1, 1]
    a = linear_probe_accuracy(enc, tiny_data.train, tiny_data.test, epochs=30)
    b = linear_probe_accuracy(rand, tiny_data.train, tiny_data.test, epochs=30)
    assert a > b


def test_yaml_config_unknown_key_and_resolved_config(tmp_path, capsys, tiny_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"methd": "sft"}))
    assert main(["finetune", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'method'" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "encoder": "random:demo",
                "method": "sft",
                "data": {"n_train": 128, "n_val": 64, "n_test": 64},
                "method_config": {"epochs": 1},
                "train": {"batch_size": 64},
            }
        )
    )
    out = tmp_path / "r2"
    assert main(["finetune", "--config", str(good), "--out", str(out), "--device", "cpu"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "sft" and cfg["method_config"]["epochs"] == 1 and cfg["train"]["batch_size"] == 64
    assert cfg["data_info"]["n_train"] == 128
    # a second run into the same directory must be explicit
    assert main(["finetune", "--config", str(good), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # a finished run keeps no checkpoint: resuming it is refused, saying why
    assert main(["finetune", "--config", str(good), "--out", str(out), "--resume"]) == 2
    assert "finished run" in capsys.readouterr().err


def test_config_resolution_errors():
    from genaf.config import parse_assignments, resolve

    with pytest.raises(ConfigError):
        resolve({"data": {"n_trian": 3}})
    assert parse_assignments(["lam=1e5", "space=features", "evolution=false"]) == {
        "lam": 1e5,
        "space": "features",
        "evolution": False,
    }


def test_demo_run_folders_are_per_encoder(tmp_path):
    """`genaf demo --encoder demo-vit` writes to its own folder by default, and a run folder made
    on another encoder (or with another method, seed or option) is refused, never reported."""
    from genaf.demo import check_run_folder, default_out, run_demo
    from genaf.errors import SpecError

    assert default_out("demo") == "demo-run" and default_out("demo-vit") == "demo-run-vit"
    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"method": "sft", "seed": 0, "encoder": "demo", "method_config": {"epochs": 4}})
    )
    check_run_folder(run, "sft", {"epochs": 4}, 0, "demo")  # the same settings: reused
    with pytest.raises(ConfigError, match="sft on demo, seed 0"):
        check_run_folder(run, "sft", {"epochs": 4}, 0, "demo-vit")
    with pytest.raises(ConfigError, match="other settings"):
        check_run_folder(run, "sft", {"epochs": 5}, 0, "demo")
    with pytest.raises(SpecError, match="demo or demo-vit"):
        run_demo(tmp_path / "x", quick=True, device="cpu", encoder="random:demo", log=lambda *_: None)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--encoder", "resnet"])
    assert e.value.code == 2
