"""k-NN and linear-probe test accuracy of an encoder against its architecture with random weights.

    python benchmarks/encoder_quality.py [--encoder demo] [--n-train 10000]
    python benchmarks/encoder_quality.py --encoder file:vit.safetensors   # a genaf ViT (vit-tiny)
    python benchmarks/encoder_quality.py --encoder file:mix.safetensors --dataset fashion-mnist+rendered-digits

Fashion-MNIST by default (``--dataset``; ``a+b`` reports each dataset of a mix on its own): the
probes train on ``--n-train`` training images (seeded split; fewer where the dataset has fewer)
and are tested on the dataset's whole test split. This is the check `genaf pretrain` prints after
pre-training.
The random-weight control is built from the encoder's own metadata (same architecture: a ResNet
of the same width and stem, or a ViT of the same patch, width, depth and heads), seeded.
"""

from __future__ import annotations

import argparse
import json

from genaf.data import load_dataset
from genaf.encoders import load_encoder
from genaf.pretrain import probe_report, split_mix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="demo")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="fashion-mnist", help="a dataset, or several joined by + (each reported)")
    a = ap.parse_args()
    enc = load_encoder(a.encoder)
    reports = {}
    for name in split_mix(a.dataset):
        dm = load_dataset(name, n_train=a.n_train, n_val=1000, seed=a.seed)
        reports[name] = probe_report(enc, dm, n_train=a.n_train, seed=a.seed)
    out = {"encoder": a.encoder, "arch": enc.arch}
    out.update(reports[a.dataset] if len(reports) == 1 else {"per_dataset": reports})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
