"""How much can ANY patch of AdvEncoder-PAT's size and place hurt the demo's SFT model?

    python benchmarks/patch_ceiling.py [--out bench-attacks] [--seed 0] [--steps 300]

``advencoder-patch`` trains a generator; this script removes the generator and optimises the
patch pixels directly (Adam on a sigmoid-parametrised patch, 3 % of the image at the bottom
right, as the attack's mask), with two objectives:

- ``encoder``: the attack's own threat model, minimise the cosine similarity between the
  encoder's features of clean and patched surrogate images (what any encoder-only patch attack
  can aim for);
- ``oracle``: white-box on the downstream model, maximise its cross-entropy on the **test**
  images themselves. This breaks the threat model on purpose: it is an upper bound on the damage
  any patch of this size and place can do to this model, not an attack.

It prints the SFT model's robust accuracy under each patch and under a uniformly random patch
(the control) and writes ``OUT/patch_ceiling.json``. It reuses ``OUT/sft`` from
``benchmarks/attack_table.py`` when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_table import _sft_model  # noqa: E402

from genaf.attacks.advencoder import patch_mask  # noqa: E402
from genaf.data import load_dataset  # noqa: E402
from genaf.demo import SETTINGS  # noqa: E402
from genaf.encoders import load_encoder  # noqa: E402
from genaf.utils import write_json  # noqa: E402


def optimise(loss_fn, images: torch.Tensor, mask: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
    raw = torch.zeros(1, *images.shape[1:], requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.1)
    for _ in range(steps):
        i = torch.randint(0, len(images), (64,), generator=gen)
        x = images[i]
        loss = loss_fn(x * (1 - mask) + torch.sigmoid(raw) * mask, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(raw).detach()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-attacks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = SETTINGS["full"]
    data = load_dataset("fashion-mnist", n_train=s["n_train"], n_val=s["n_val"], n_test=s["n_test"], seed=a.seed)
    enc = load_encoder("demo").eval().requires_grad_(False)
    model = _sft_model(out, data, a.seed).requires_grad_(False)
    sur = data.surrogate(s["n_surrogate"]).float_images()
    xt, yt = data.test.float_images(), data.test.labels
    mask = patch_mask(*xt.shape[-2:], 0.03)
    gen = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        f0 = enc(sur)
    patches = {
        "random patch (control)": torch.rand(1, *xt.shape[1:], generator=gen),
        "encoder objective (threat model)": optimise(
            lambda xp, i: F.cosine_similarity(enc(xp), f0[i]).mean(), sur, mask, a.steps, gen
        ),
        "oracle: downstream CE on the test images": optimise(
            lambda xp, i: -F.cross_entropy(model(xp), yt[i]), xt, mask, a.steps, gen
        ),
    }
    clean = accuracy(model, xt, yt)
    res = {"clean_acc": clean, "patch_pixels": int(mask.sum()), "image_size": list(xt.shape[-2:]), "robust_acc": {}}
    print(f"clean accuracy {100 * clean:.1f} %; patch of {int(mask.sum())} pixels ({tuple(xt.shape[-2:])} images)")
    for name, p in patches.items():
        ra = accuracy(model, xt * (1 - mask) + p * mask, yt)
        res["robust_acc"][name] = ra
        print(f"  {name}: robust accuracy {100 * ra:.1f} % (drop {100 * (clean - ra):.1f} points)")
    write_json(out / "patch_ceiling.json", res)
    (out / "patch_ceiling.txt").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
