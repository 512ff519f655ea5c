"""k-NN and linear-probe test accuracy of an encoder against its architecture with random weights.

    python benchmarks/encoder_quality.py [--encoder demo] [--n-train 10000]
    python benchmarks/encoder_quality.py --encoder file:vit.safetensors   # a genaf ViT (vit-tiny)

Fashion-MNIST: the probes train on ``--n-train`` training images (seeded split) and are tested on
the full 10,000-image test split. This is the check `genaf pretrain` prints after pre-training.
The random-weight control is built from the encoder's own metadata (same architecture: a ResNet
of the same width and stem, or a ViT of the same patch, width, depth and heads), seeded.
"""

from __future__ import annotations

import argparse
import json

from genaf.data import load_dataset
from genaf.encoders import load_encoder
from genaf.pretrain import probe_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="demo")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dm = load_dataset("fashion-mnist", n_train=a.n_train, n_val=1000, seed=a.seed)
    enc = load_encoder(a.encoder)
    report = probe_report(enc, dm, n_train=a.n_train, seed=a.seed)
    print(json.dumps({"encoder": a.encoder, "arch": enc.arch, **report}, indent=2))


if __name__ == "__main__":
    main()
