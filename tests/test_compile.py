"""``train.compile``: torch.compile of the downstream model.

A counting dynamo backend (it runs the captured graphs as they are) shows that the model is
compiled once per mode — eval for the attack, train for the update — and not again however
often training flips between them, and that the compiled run trains exactly the same model.
"""

import dataclasses

import pytest
import torch

from genaf.encoders import load_encoder
from genaf.errors import ConfigError
from genaf.methods.base import create_method
from genaf.models import DownstreamModel
from genaf.train import TrainConfig, Trainer

dynamo = pytest.importorskip("torch._dynamo")

COMPILES: list[int] = []


@dynamo.register_backend(name="genaf_test_counting")
def _counting(gm, example_inputs):
    COMPILES.append(len(gm.graph.nodes))
    return gm.forward


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tiny_data):
    return dataclasses.replace(tiny_data, train=tiny_data.train.subset(48), val=tiny_data.val.subset(16))


def _fit(tmp_path, data, epochs: int, compile: str):
    dynamo.reset()
    COMPILES.clear()
    method = create_method("at", epochs=epochs, attack_steps=2, warmup_epochs=0)
    torch.manual_seed(0)
    model = DownstreamModel(load_encoder("random:demo"), data.num_classes)
    cfg = TrainConfig(
        batch_size=16,
        n_val_robust=8,
        val_steps=1,
        augment=False,
        progress=False,
        compile=compile,
        compile_backend="genaf_test_counting",
        # the compiled module is attacked as it is (no BatchNorm fold under compile): the eager
        # run it is compared with attacks the module itself too
        fold_bn=False,
    )
    run = tmp_path / f"{compile}-{epochs}"
    run.mkdir()
    Trainer(model, data, method, cfg, run, torch.device("cpu"), log=lambda *_: None).fit()
    return model, len(COMPILES)


def test_compiled_once_per_mode_and_same_result(tmp_path, small):
    plain, n0 = _fit(tmp_path, small, 2, "none")
    assert n0 == 0
    one, n1 = _fit(tmp_path, small, 1, "default")
    two, n2 = _fit(tmp_path, small, 2, "default")
    # 3 batches per epoch, 2 attack steps each: the mode flips 6+ times per epoch. One graph for
    # the attack (eval, input gradient), one for the update (train), one for evaluation (no grad),
    # and at most one dynamic-batch recompile each for the smaller validation batches; a second
    # epoch (with its validation PGD) adds no compilation at all.
    assert 3 <= n1 <= 6, n1
    assert n2 == n1
    # Keys unchanged (nn.Module.compile works in place) and the same weights as eager training.
    ps, ts = plain.state_dict(), two.state_dict()
    assert list(ps) == list(ts)
    for k in ps:
        torch.testing.assert_close(ts[k], ps[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_compile_mode():
    with pytest.raises(ConfigError, match="compile must be one of"):
        TrainConfig(compile="fast").validate()


def test_data_placement_rules(tiny_data):
    from genaf.train import fits_on_device, place_data

    assert fits_on_device(1 << 30, 8 << 30) and not fits_on_device(3 << 30, 8 << 30)
    assert place_data(tiny_data, torch.device("cpu"), "on") is tiny_data  # nothing to move on the CPU
    with pytest.raises(ConfigError, match="data_on_device must be"):
        TrainConfig(data_on_device="yes").validate()
    if torch.cuda.is_available():  # on a GPU machine: the images live on the device, still uint8
        moved = place_data(tiny_data, torch.device("cuda"), "on")
        assert moved.train.images.is_cuda and moved.train.images.dtype == torch.uint8
        x, y, _ = next(moved.train.batches(8, device="cuda"))
        assert x.is_cuda and y.is_cuda
