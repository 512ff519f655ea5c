"""``layer: auto`` / ``location: auto`` — the attacker picks a free choice of its attack (the hooked
layer, or where a patch goes) from the public encoder and surrogate data.

Layer-objective attacks (L4A/PAP, its fuse variant) are defined on "a low layer", and which low
layer works best differs from encoder to encoder. An attacker in the DAE threat model holds the
encoder and surrogate images, so it can choose: with ``layer: auto`` (or ``layer2: auto``) the
attack is crafted once per candidate layer on most of the surrogate images, and the candidate
whose δ moves the encoder's **output features** the most on the remaining held-out surrogate
images wins. The score is the mean cosine distance ``1 − cos(f(x), f(x+δ))``. The patch attack
(``advencoder-patch``) chooses its place the same way with ``location: auto``: one patch per
candidate place (``location_candidates``, default all nine named places), scored on the held-out
images with the patch pasted in.

Nothing downstream (head, labels, fine-tuned weights, test data) takes part in the choice. The
perturbation records every candidate's score and the winner in its config (``layer_auto``,
or ``location_auto`` for the patch's place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..errors import ConfigError
from ..utils import Progress
from .base import eval_mode

AUTO_KEYS = ("layer", "layer2", "location")
LAYER_KEYS = ("layer", "layer2")
HELD_OUT_FRACTION = 0.2


def low_layer_candidates(encoder) -> list[str]:
    """The low layers an attacker may hook (:func:`genaf.encoders.layout.low_layers`): the stem's
    output and every block of the first two ResNet stages (the first half of a CNN's stages), or
    a transformer's patch embedding and the blocks of its first half."""
    from ..encoders.layout import low_layers

    return low_layers(getattr(encoder, "backbone", encoder))


def candidates_for(attack, key: str) -> list[str]:
    given = str(attack.cfg.get(f"{key}_candidates" if key == "location" else "layer_candidates") or "")
    names = [n.strip() for n in given.split(",") if n.strip()]
    if key == "location":
        from .advencoder import LOCATIONS, patch_origin

        for n in names:
            patch_origin(8, 8, 1, n)  # an unknown place lists the known ones
        return names or list(LOCATIONS)
    names = names or low_layer_candidates(attack.encoder)
    if not names:
        raise ConfigError(
            f"{attack.name}: {key}: auto needs layer_candidates for this encoder (no ResNet stem or "
            "stage-1/2 blocks and no transformer blocks found); set layer_candidates to a comma-separated "
            "list of its layers"
        )
    for n in names:
        attack.encoder.get_layer(n)  # an unknown name lists the available ones
    resolve = getattr(attack.encoder, "resolve_layer", lambda n: n)
    other = {resolve(str(attack.cfg.get(k))) for k in LAYER_KEYS if k != key and attack.cfg.get(k)}
    return [n for n in names if resolve(n) not in other]


def split_surrogate(data: ImageSet) -> tuple[ImageSet, ImageSet]:
    """Deterministic split: the last ``HELD_OUT_FRACTION`` of the images score the candidates."""
    n = len(data)
    if n < 10:
        raise ConfigError(f"'auto' choices need at least 10 surrogate images to hold some out, got {n}")
    k = max(int(round(n * HELD_OUT_FRACTION)), 5)
    cut = n - k

    def part(sl: slice) -> ImageSet:
        return ImageSet(data.images[sl], data.labels[sl], data.indices[sl], data.split, data.dataset)

    return part(slice(0, cut)), part(slice(cut, n))


@torch.no_grad()
def feature_distortion(encoder, delta, data: ImageSet, device, batch_size: int = 256, parallel=None) -> float:
    """Mean ``1 − cos(f(x), f(x'))`` of the encoder's output features over ``data``, where ``x'``
    is ``delta.apply(x)`` for a Perturbation (additive or patch) and ``clamp(x + δ, 0, 1)`` for a
    plain tensor δ. ``parallel`` (a team of several processes): each process scores its rows of
    every batch and the sums are added up, so every process returns the same number."""
    apply = delta.apply if hasattr(delta, "apply") else lambda x: (x + delta.to(x.device)).clamp(0, 1)
    team = parallel if parallel is not None and getattr(parallel, "distributed", False) else None
    part = None if team is None else (team.rank, team.world)
    total, n = 0.0, 0
    with eval_mode(encoder):
        for x, _, _ in data.batches(batch_size, device=device, part=part):
            if len(x) == 0:
                continue
            f0 = encoder(x).flatten(1).float()
            f1 = encoder(apply(x)).flatten(1).float()
            total += float((1 - F.cosine_similarity(f0, f1, dim=1)).sum())
            n += len(x)
    if team is not None:
        summed = team.sum_values({"total": total, "n": float(n)})
        total, n = summed["total"], int(summed["n"])
    return total / max(n, 1)


def fit_auto(attack, data: ImageSet, device, surrogate: str = "", log=None, parallel=None):
    """Craft ``attack`` once per candidate (layer or patch place) and keep the one whose
    perturbation distorts the encoder's features most on held-out surrogate images. ``parallel``
    (a team of several processes) is passed to each candidate's ``fit`` and shares the held-out
    scoring, so every process holds the same scores and makes the same choice."""
    keys = [k for k in AUTO_KEYS if attack.cfg.get(k) == "auto"]
    if len(keys) != 1:
        raise ConfigError(f"{attack.name}: only one of {AUTO_KEYS} may be 'auto' (got {keys})")
    key = keys[0]
    craft_set, held_out = split_surrogate(data)
    scores: dict[str, float] = {}
    best = None
    seconds = 0.0
    cands = candidates_for(attack, key)
    bar = Progress(len(cands), f"{attack.name}: choosing {key} (auto)", unit="candidates", log=log)
    with bar:
        for cand in cands:
            sub = type(attack)(attack.encoder, attack.preset, **{**attack.cfg, key: cand})
            sub_log = (lambda msg, c=cand: log(f"[{key}={c}] {msg}")) if log else None
            pert = sub.fit(craft_set, device=device, surrogate=surrogate, log=sub_log, parallel=parallel)
            seconds += getattr(sub, "seconds", 0.0)
            scores[cand] = feature_distortion(attack.encoder, pert, held_out, device, parallel=parallel)
            bar.update(1, f"{key}={cand}: held-out feature distortion (mean 1-cos) {scores[cand]:.4f}")
            if best is None or scores[cand] > scores[best[0]]:
                best = (cand, pert, sub)
    assert best is not None
    cand, pert, sub = best
    if log:
        log(f"{attack.name}: {key}={cand} chosen (largest held-out feature distortion, {scores[cand]:.4f})")
    # From here on the attack *is* the winning candidate (its objective, ``score``, a refit).
    for k, v in vars(sub).items():
        setattr(attack, k, v)
    attack.seconds = seconds
    attack.images_seen = getattr(sub, "images_seen", 0) * len(scores)
    attack.history = getattr(sub, "history", [])
    pert.config["location_auto" if key == "location" else "layer_auto"] = {
        "key": key,
        "chosen": cand,
        "scores": scores,
        "rule": "max mean 1-cos(f(x), f(x')) on the held-out surrogate images",
        "held_out": len(held_out),
    }
    return pert
