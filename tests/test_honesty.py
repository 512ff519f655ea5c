"""Every number honest by construction: the attacker's images, the data actually read, the
regulariser under autocast, per-sample DAEs, other datasets, budgets and stale caches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genaf
from _reliability import recorder, section
from _tiny import tiny_resnet
from genaf.attacks import Perturbation
from genaf.cli import main
from genaf.data import load_dataset
from genaf.data.module import index_digest
from genaf.methods.base import create_method

_record = recorder("names.json", lambda n: section(7) if "one_stem" in n else None, "both kept")

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genaf", *args], capture_output=True, text=True, env=env)


# --- 1. the attacker's images ---------------------------------------------------------------
@needs_fashion
@pytest.mark.slow
def test_cli_and_api_surrogates_share_no_image_with_a_default_finetune(tmp_path):
    """genaf attack (CLI defaults) and genaf.craft draw 2,000 surrogates; a genaf finetune with
    the default splits of the same dataset and seed trains and validates on none of them."""
    r = _cli("attack", "--attack", "uniform-noise", "--eps", "16/255", "--out", str(tmp_path / "noise.safetensors"))
    assert r.returncode == 0, r.stderr
    cli_rec = Perturbation.load(tmp_path / "noise.safetensors").config["surrogate_data"]
    data = genaf.load_dataset("fashion-mnist")
    api_rec = genaf.craft("random:demo", "uniform-noise", data.surrogate(2000), eps=16 / 255).config["surrogate_data"]
    assert cli_rec["n"] == api_rec["n"] == 2000  # the count used is the count asked for
    assert cli_rec["dataset"] == "fashion-mnist" and cli_rec["split"] == "surrogate"

    run = tmp_path / "run"
    # the default splits (no --n-train / --n-val); a linear probe for one epoch on a width-4 encoder
    # keeps it short (the splits do not depend on the encoder)
    enc = tiny_resnet(tmp_path)
    r = _cli("finetune", "--encoder", enc, "--method", "lp", "--epochs", "1", "--n-test", "200", "--out", str(run))
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "metrics.json").read_text())["data"]
    # the run's own record of its splits (digests of the indices it trained and validated on)
    dm = load_dataset("fashion-mnist", n_test=200, seed=0)
    assert index_digest(dm.train.indices) == info["train_indices_sha256"]
    assert index_digest(dm.val.indices) == info["val_indices_sha256"]
    used = set(dm.train.indices.tolist()) | set(dm.val.indices.tolist())
    assert len(used) == 60000 - info["surrogate_reserve"]
    for rec in (cli_rec, api_rec):
        assert not used & set(rec["indices"])
    # and with another seed too: the reserve does not depend on it
    other = load_dataset("fashion-mnist", seed=7)
    assert not (set(other.train.indices.tolist()) | set(other.val.indices.tolist())) & set(cli_rec["indices"])


def _folder(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    from PIL import Image

    for split, n in (("train", n_train), ("test", n_test)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                Image.new("RGB", (8, 8), (10 * i, 50 if c == "a" else 200, 0)).save(root / split / c / f"{i}.png")
    return root


def test_asking_for_more_surrogates_than_the_reserve_holds_is_an_error(tmp_path):
    folder = _folder(tmp_path / "task", n_train=40)
    r = _cli(
        "attack",
        "--encoder",
        "random:demo",
        "--attack",
        "uniform-noise",
        "--eps",
        "8/255",
        "--surrogate",
        f"imagefolder:{folder}",
        "--image-size",
        "28",
        "--out",
        str(tmp_path / "p.safetensors"),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "2000 surrogate images were asked for" in r.stderr and "holds 4" in r.stderr
    assert not (tmp_path / "p.safetensors").exists()
    ok = _cli(
        "attack",
        "--encoder",
        "random:demo",
        "--attack",
        "uniform-noise",
        "--eps",
        "8/255",
        "--surrogate",
        f"imagefolder:{folder}",
        "--image-size",
        "28",
        "--n-surrogate",
        "4",
        "--out",
        str(tmp_path / "p.safetensors"),
    )
    assert ok.returncode == 0, ok.stderr
    rec = Perturbation.load(tmp_path / "p.safetensors").config["surrogate_data"]
    assert rec["n"] == 4 and len(rec["indices"]) == 4


def test_craft_refuses_images_of_a_downstream_split(tiny_data):
    for split in (tiny_data.train, tiny_data.val, tiny_data.test):
        with pytest.raises(genaf.ConfigError, match="surrogate reserve"):
            genaf.craft("random:demo", "uniform-noise", split.subset(8), eps=8 / 255)
    pert = genaf.craft("random:demo", "uniform-noise", tiny_data.surrogate(8), eps=8 / 255)
    assert pert.config["surrogate_data"]["indices"] == tiny_data.surrogate_pool.indices[:8].tolist()


def test_reserve_is_independent_of_seed_and_split_sizes():
    from genaf.data.module import default_reserve, reserve_order

    assert default_reserve(60000) == 5000 and default_reserve(18) == 1
    assert torch.equal(reserve_order(100), reserve_order(100))
    # a surrogate set of n images is the same for every reserve that holds it
    assert torch.equal(reserve_order(100)[:7], reserve_order(100)[:10][:7])


# --- 7. the data actually read ---------------------------------------------------------------
def test_an_asked_for_data_root_that_lacks_the_files_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    empty = tmp_path / "nope"
    empty.mkdir()
    r = _cli("finetune", "--encoder", "random:demo", "--data-root", str(empty), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"--data-root {empty} was asked for" in r.stderr
    monkeypatch.setenv("GENAF_FASHION_MNIST", str(empty))
    with pytest.raises(genaf.DataError, match=f"GENAF_FASHION_MNIST={empty} was asked for"):
        load_dataset("fashion-mnist", n_train=10, n_val=10)


@needs_fashion
def test_the_folder_read_is_recorded(tiny_data):
    assert tiny_data.info["source"] == str(FASHION.resolve())


def test_a_tiny_validation_split_or_probe_warns(tmp_path, tiny_data, capsys):
    genaf.finetune(
        "random:demo",
        "fashion-mnist",
        "genaf",
        tmp_path / "g",
        method_config={"epochs": 1, "attack_steps": 1, "warmup_epochs": 0, "stage2_epochs": 1, "probe_size": 20},
        train={"batch_size": 64, "n_val_robust": 16},
        datamodule=tiny_data,
        config={"eval": {"whitebox": None}},
        log=lambda *a: None,
    )
    err = capsys.readouterr().err
    assert "validation split of fashion-mnist holds only 96 images" in err
    assert "stage 2 probe (validation PGD examples) holds only 20 images" in err


# --- 5. the regulariser under autocast -------------------------------------------------------
def test_genetic_regulariser_under_cpu_bf16_autocast_equals_float32_on_collinear_features():
    from genaf.methods.genetic import genetic_regularizer

    g = torch.Generator().manual_seed(0)
    n, d = 32, 64
    base = torch.randn(1, d, generator=g)
    a = (base + 1e-3 * torch.randn(n, d, generator=g)).requires_grad_(True)  # nearly collinear rows
    b = base + 1e-3 * torch.randn(n, d, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    w = torch.rand(n, generator=g)
    ref = genetic_regularizer(a, b, y, w, "mean")
    (g32,) = torch.autograd.grad(ref, a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = genetic_regularizer(a, b, y, w, "mean")
    (g16,) = torch.autograd.grad(low, a)
    assert low.dtype == torch.float32
    assert torch.allclose(low, ref, rtol=1e-6, atol=0)
    assert float(g16.abs().max()) > 0
    assert torch.allclose(g16, g32, rtol=1e-5, atol=1e-12)


# --- 8. FARE's fast mode has no CE guard through an untrained head -----------------------------
def test_fare_has_no_cross_entropy_guard(tmp_path, tiny_data):
    with pytest.raises(genaf.ConfigError, match="no fast-mode guard"):
        create_method("fare", guard=True)
    m = genaf.finetune(
        "random:demo",
        "fashion-mnist",
        "fare",
        tmp_path / "fare",
        method_config={"epochs": 1, "attack_steps": 1, "probe_epochs": 1},
        train={"batch_size": 64, "n_val_robust": 0},
        datamodule=tiny_data,
        config={"eval": {"whitebox": None}},
        log=lambda *a: None,
    )
    history = json.loads((tmp_path / "fare" / "history.json").read_text())
    assert all("guard_pgd_acc" not in row for row in history)
    assert m["budget"]["epochs_run"] == {"fare": 1, "fare-probe": 1}


# --- 9, 4, 8: evaluation records --------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("run") / "sft"
    torch.set_num_threads(1)
    genaf.finetune(
        "demo",
        "fashion-mnist",
        "sft",
        out,
        method_config={"epochs": 1},
        train={"batch_size": 64, "n_val_robust": 0},
        data={"n_train": 192, "n_val": 96, "n_test": 96},
        config={"eval": {"whitebox": None}},
        log=lambda *a: None,
    )
    return out


def test_metrics_name_the_data_and_the_budget(small_run, tiny_data):
    m = json.loads((small_run / "metrics.json").read_text())
    assert m["evaluated_on"] == {"dataset": "fashion-mnist", "split": "test", "n": 96}
    b = m["budget"]
    assert b["epochs_run"] == {"sft": 1} and b["total_epochs"] == 1
    passes = b["encoder_passes_per_train_image"]["train"]
    # one clean forward+backward per training image per epoch (the last partial batch is dropped)
    assert 0.6 <= passes["forward_backward"] <= 1.0 and passes["forward"] == 0
    assert m["data"]["train_indices_sha256"] == index_digest(tiny_data.train.indices)


def test_evaluating_on_another_dataset_needs_its_own_file(small_run, tmp_path):
    before = (small_run / "metrics.json").read_text()
    with pytest.raises(genaf.ConfigError, match="--out FILE"):
        genaf.evaluate(small_run, {}, dataset="rendered-digits")
    assert (small_run / "metrics.json").read_text() == before
    out = tmp_path / "digits.json"
    noise = genaf.craft("demo", "uniform-noise", load_dataset("rendered-digits").surrogate(32), eps=16 / 255)
    m = genaf.evaluate(small_run, {"noise": noise}, dataset="rendered-digits", out=out)
    assert (small_run / "metrics.json").read_text() == before  # the run's record is untouched
    saved = json.loads(out.read_text())
    assert saved["evaluated_on"]["dataset"] == "rendered-digits" and saved["run"] == str(small_run)
    assert saved["attacks"]["noise"]["dataset"] == "rendered-digits" and saved["attacks"]["noise"]["split"] == "test"
    assert m["clean_acc"] == saved["clean_acc"]


def test_per_sample_dae_is_crafted_on_the_original_encoder_and_reported(small_run, capsys):
    code = main(["evaluate", "--model", str(small_run), "--attack", "ssp", "--set", "steps=2"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((small_run / "metrics.json").read_text())
    e = m["attacks"]["ssp"]
    assert e["type"] == "per-sample" and e["attack"] == "ssp" and e["split"] == "test"
    assert e["encoder_hash"] == m["encoder_hash"]  # crafted on the encoder the run started from
    assert e["seconds"] > 0 and e["images_per_second"] > 0
    assert 0 <= m["robust_acc"]["ssp"] <= 1
    assert m["checks"]["perturbation_applied"]["ssp"]["passed"]
    out = capsys.readouterr().out
    assert "ssp" in out


def test_per_sample_dae_refuses_an_encoder_that_changed(small_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["encoder"] = "random:demo"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(genaf.CheckpointError, match="original encoder"):
        genaf.evaluate(run, {}, per_sample=["ssp"])


def test_surrogate_overlap_with_the_defenders_images_fails_a_check(small_run, tiny_data):
    noise = genaf.craft("demo", "uniform-noise", tiny_data.surrogate(16), eps=16 / 255)
    m = genaf.evaluate(small_run, {"honest": noise})
    assert m["checks"]["surrogates_disjoint"]["passed"]
    # the same δ, recorded as crafted from the run's own training images
    noise.config["surrogate_data"] = {**noise.config["surrogate_data"], "indices": tiny_data.train.indices[:5].tolist()}
    m = genaf.evaluate(small_run, {"leaky": noise})
    assert "surrogates_disjoint" in m["checks"]["failed"]
    assert "5 train" in m["checks"]["surrogates_disjoint"]["detail"]


def test_transfer_entries_say_what_they_were_crafted_on(small_run, tiny_data):
    pert = genaf.craft("random:demo", "uniform-noise", tiny_data.surrogate(8), eps=16 / 255)
    m = genaf.evaluate(small_run, {"other-encoder": pert})
    e = m["attacks"]["other-encoder"]
    assert e["transfer"] is True and e["transfer_from"] == "random:demo"


def test_two_perturbation_files_with_one_stem_keep_both_entries(tmp_path):
    from genaf.cli import perturbation_names

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    names = perturbation_names([str(tmp_path / "a" / "eps16.pt"), str(tmp_path / "b" / "eps16.pt")])
    assert sorted(names) == ["a/eps16", "b/eps16"]
    with pytest.raises(genaf.ConfigError, match="twice"):
        perturbation_names([str(tmp_path / "a" / "x.pt"), str(tmp_path / "a" / "x.pt")])


def test_public_names_are_the_documented_functions():
    """Importing every submodule must not shadow a documented function with a module."""
    import importlib
    import pkgutil

    import genaf.api

    functions = ("load_encoder", "load_dataset", "load_model", "finetune", "craft", "evaluate", "export")
    # a submodule named like a function would replace it on the package once imported
    assert not {m.name for m in pkgutil.iter_modules(genaf.__path__)} & set(functions)
    for info in pkgutil.walk_packages(genaf.__path__, "genaf."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in functions:
        assert getattr(genaf, name) is getattr(genaf.api, name), name
        assert callable(getattr(genaf, name)) and not isinstance(getattr(genaf, name), type(genaf)), name
        assert name in genaf.__all__, name
    # genaf.attacks is the subpackage with the torchattacks-style objects the README uses
    assert genaf.attacks is importlib.import_module("genaf.attacks") and "attacks" in genaf.__all__
    for name in ("PGD", "FGSM", "Universal", "Perturbation", "pgd", "fgsm"):
        assert callable(getattr(genaf.attacks, name)), name
