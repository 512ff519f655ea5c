"""``layer: auto`` and ``location: auto``: the attacker chooses the hooked layer, or the patch's place,
from the encoder and surrogate data only."""

import pytest
import torch

from genaf.attacks import create_attack
from genaf.attacks.advencoder import LOCATIONS, patch_mask
from genaf.attacks.layer_select import feature_distortion, low_layer_candidates, split_surrogate
from genaf.errors import ConfigError, SpecError

EPS = 16 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def test_candidates_and_split(tiny_encoder, tiny_data):
    assert low_layer_candidates(tiny_encoder) == ["relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    sur = tiny_data.surrogate(50)
    a, b = split_surrogate(sur)
    assert len(a) == 40 and len(b) == 10
    assert set(a.indices.tolist()).isdisjoint(b.indices.tolist())
    with pytest.raises(ConfigError, match="at least 10"):
        split_surrogate(sur.subset(5))


def test_distortion_hand_checks(tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(16)
    zero = torch.zeros(1, *sur.images.shape[1:])
    assert feature_distortion(tiny_encoder, zero, sur, "cpu") == pytest.approx(0.0, abs=1e-6)
    big = torch.full_like(zero, EPS)
    assert feature_distortion(tiny_encoder, big, sur, "cpu") > 0


@pytest.mark.parametrize(("name", "key"), [("l4a-base", "layer"), ("l4a-fuse", "layer2")])
def test_auto_picks_the_most_distorting_candidate(name, key, tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(60)
    cands = "relu,layer1.0,layer2.1"
    att = create_attack(
        name, tiny_encoder, eps=EPS, iterations=6, batch_size=16, layer_candidates=cands, **{key: "auto"}
    )
    p = att.fit(sur)
    info = p.config["layer_auto"]
    expected = [c for c in cands.split(",") if not (name == "l4a-fuse" and c == "relu")]  # fuse's first layer is relu
    assert list(info["scores"]) == expected and info["key"] == key and info["held_out"] == 12
    assert info["chosen"] == max(info["scores"], key=info["scores"].get)
    assert p.config[key] == info["chosen"] and p.linf() <= EPS + 1e-6
    # The recorded score is the held-out feature distortion of exactly this δ.
    _, held = split_surrogate(sur)
    assert feature_distortion(tiny_encoder, p.delta, held, "cpu") == pytest.approx(
        info["scores"][info["chosen"]], rel=1e-4
    )
    # Each candidate crafted with its layer named explicitly gives the same δ for the winner.
    craft, _ = split_surrogate(sur)
    named = create_attack(name, tiny_encoder, eps=EPS, iterations=6, batch_size=16, **{key: info["chosen"]})
    assert torch.equal(named.fit(craft).delta, p.delta)
    # After fit the attack is the winner: it scores δ with the chosen layer's objective.
    assert att.score(p.delta, sur) == pytest.approx(named.score(p.delta, sur))


def test_auto_refused_where_unsupported_and_bad_candidates(tiny_encoder, tiny_data):
    with pytest.raises(ConfigError, match="does not support layer: auto"):
        create_attack("advencoder", tiny_encoder, eps=EPS, layer="auto")
    att = create_attack("l4a-base", tiny_encoder, eps=EPS, iterations=2, layer_candidates="relu,layer9")
    with pytest.raises(SpecError, match="layer1.0.conv1"):
        att.fit(tiny_data.surrogate(20))
    att = create_attack("l4a-base", tiny_encoder, eps=EPS, layer="auto")
    with pytest.raises(ConfigError, match="resolved by fit"):
        att.score(torch.zeros(1, 3, 28, 28), tiny_data.surrogate(4))


def test_patch_location_auto_picks_the_most_distorting_place(tiny_encoder, tiny_data):
    sur = tiny_data.surrogate(60)
    opts = {"iterations": 4, "batch_size": 16}
    att = create_attack("advencoder-patch", tiny_encoder, location="auto", **opts)
    p = att.fit(sur)
    info = p.config["location_auto"]
    assert "layer_auto" not in p.config and info["key"] == "location" and info["held_out"] == 12
    assert list(info["scores"]) == list(LOCATIONS)
    assert info["chosen"] == max(info["scores"], key=info["scores"].get) and p.config["location"] == info["chosen"]
    assert len(set(info["scores"].values())) > 1  # the places really differ
    # The patch and its mask sit at the chosen place, and the score is that patch's held-out distortion.
    assert torch.equal(p.mask, patch_mask(28, 28, 0.03, info["chosen"]))
    assert torch.equal(p.delta * (1 - p.mask), torch.zeros_like(p.delta))
    craft, held = split_surrogate(sur)
    assert feature_distortion(tiny_encoder, p, held, "cpu") == pytest.approx(info["scores"][info["chosen"]], rel=1e-4)
    # The winner equals the patch crafted at that place by name, and the fitted attack scores there.
    named = create_attack("advencoder-patch", tiny_encoder, location=info["chosen"], **opts)
    assert torch.equal(named.fit(craft).delta, p.delta)
    assert att.score(p.delta, sur) == pytest.approx(named.score(p.delta, sur))
    # A candidate list narrows the search, and an unknown place in it is refused with the known ones.
    few = create_attack(
        "advencoder-patch", tiny_encoder, location="auto", location_candidates="top-left,center", **opts
    )
    assert list(few.fit(sur).config["location_auto"]["scores"]) == ["top-left", "center"]
    bad = create_attack("advencoder-patch", tiny_encoder, location="auto", location_candidates="middle", **opts)
    with pytest.raises(ConfigError, match="unknown patch location 'middle'"):
        bad.fit(sur)
