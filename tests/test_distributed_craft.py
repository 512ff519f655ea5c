"""Universal attack crafting under torchrun (genaf.craft, genaf attack): two CPU processes on gloo,
started as torchrun starts them (tests/_ddp.py), against one process.

What "the same" means here. Both runs draw δ's start and the order of the surrogate batches from
the seed alike; each of the two processes computes the objective and its δ-gradient on its half of
every batch, and the row-weighted sums are added up (``genaf.attacks.universal.mean_over_rows``).
The gradient is thus the single-process gradient up to the order of float additions (~1e-7
relative), and a sign step only differs where a coordinate of the gradient is that close to zero.
Measured on this configuration and on one with 30-40 steps per attack: every pixel of every
sign-step δ identical, so the test asks for exact equality of δ and the objective after every step
within 1e-5 relative. AdvEncoder trains a generator with Adam, whose first steps are about
``lr·sign(g)`` on every weight, so a weight whose gradient is near zero amplifies the rounding
difference: after 4 steps δ was within 3e-8 of one process's, after 20 within 6e-4 (1.2 % of ε,
42 % of pixels apart by more than 1e-7). After 3 steps it was within 1e-5 on one machine and 9e-5
(0.18 % of ε = 0.05) on another (an AMD EPYC); the test runs 3 steps and allows 5e-4 (1 % of ε),
24 times below the smaller of the two faults below. A real fault is far
outside these tolerances: δ-gradients not summed across the processes left 47 % of the SSP pixels
apart (by up to 0.04), and the InfoNCE term not divided among the processes moved AdvEncoder's δ
by 0.012.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import _ddp

pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTIVE_RTOL = 1e-5
ADVENCODER_ATOL = 5e-4

# tiny: 64 surrogate images, batches of 32 (16 rows per process), a few steps each
SPECS = {
    # layer: auto (the cpu preset): every candidate layer crafted shared, the held-out scores summed
    "l4a-base": {"iterations": 3, "batch_size": 32, "layer_candidates": "relu,layer1.1"},
    "ssp-universal": {"iterations": 6, "batch_size": 32},
    "l4a-ugs": {"iterations": 4, "batch_size": 32},  # Gaussian images drawn for the whole batch
    "sgd-uap": {"iterations": 4, "batch_size": 32, "objective": "clipped-ce", "head_images": 64},
    "advencoder": {"iterations": 3, "batch_size": 32},  # a generator: its gradients summed
    "fff": {"iterations": 4},  # data-free: replicated on every process
}
SIGN_STEPS = ("l4a-base", "ssp-universal", "l4a-ugs", "sgd-uap", "fff")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("craft")
    (root / "one").mkdir()
    (root / "two").mkdir()
    one = _ddp.craft(0, str(root / "one"), SPECS, ("l4a-base",))
    assert not torch.distributed.is_initialized()  # one process: no process group
    _ddp.spawn(_ddp.craft, 2, str(root / "two"), SPECS, ("l4a-base",))
    two = [json.loads((root / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, one, two


def test_two_processes_craft_the_delta_of_one(crafted):
    _, one, (rank0, rank1) = crafted
    for name in SPECS:
        a, b = torch.tensor(one[name]["delta"]), torch.tensor(rank0[name]["delta"])
        if name in SIGN_STEPS:
            assert torch.equal(a, b), (name, float((a != b).float().mean()))
        else:
            assert torch.allclose(a, b, rtol=0, atol=ADVENCODER_ATOL), (name, float((a - b).abs().max()))
        # the objective after every step is the whole batch's, as one process computes it
        h1, h2 = one[name]["history"], rank0[name]["history"]
        assert len(h1) == len(h2) == SPECS[name]["iterations"]
        assert h2 == pytest.approx(h1, rel=OBJECTIVE_RTOL), name
        c1, c2 = one[name]["config"], rank0[name]["config"]
        assert c2["images_seen"] == c1["images_seen"] and c2["surrogate_data"] == c1["surrogate_data"]
        assert "distributed" not in c1
        mode = "replicated" if name == "fff" else "sharded"
        assert c2["distributed"] == {"world_size": 2, "backend": "gloo", "crafting": mode}
        if name in rank1:  # every process returns rank 0's perturbation
            assert rank1[name]["delta"] == rank0[name]["delta"] and rank1[name]["config"] == c2
    # layer: auto chose the same layer on the shared held-out scores
    auto1, auto2 = one["l4a-base"]["config"]["layer_auto"], rank0["l4a-base"]["config"]["layer_auto"]
    assert auto2["chosen"] == auto1["chosen"]
    assert auto2["scores"] == pytest.approx(auto1["scores"], rel=1e-5)


def test_only_rank_0_writes(crafted):
    root, _, (rank0, rank1) = crafted

    def written(folder):
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("rank"))

    files = written(root / "two")
    assert files == written(root / "one") and len(files) == len(SPECS) + 2  # the files; the pictures once
    assert not any(f.endswith(".tmp") for f in files)
    assert "l4a-base" in rank0 and "l4a-base" not in rank1  # genaf attack: rank 0 read its own file
    from genaf.attacks import Perturbation

    for name in SPECS:
        saved = Perturbation.load(root / "two" / f"{name}.safetensors")
        assert saved.delta.flatten().tolist() == rank0[name]["delta"]


def test_a_batch_every_process_cannot_share_is_refused():
    from genaf.attacks.universal import check_rows
    from genaf.errors import ConfigError

    check_rows(None, 1, 1, "l4a-base")  # one process: anything goes
    check_rows(SimpleNamespace(world=2), 32, 2, "l4a-base")
    with pytest.raises(ConfigError, match="cannot be shared by 2 processes"):
        check_rows(SimpleNamespace(world=2), 1, 64, "l4a-base")


def test_attacks_import_nothing_of_torch_distributed():
    """The attacks get a team (``parallel=``) and reach the other processes through it only."""
    found = _ddp.distributed_references("attacks")
    assert len(found) > 10
    assert not {f: names for f, names in found.items() if names}
