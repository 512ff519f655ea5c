"""A small list of known public encoders (``genaf encoders``): where they come from and how to load them.

A sha256 is given only where the publisher states one. None of the sources below publishes a full
sha256 of its weight file on its download page, so ``sha256`` is ``None`` ("not published")
everywhere; torchvision's file names carry the first 8 hex digits of the file's sha256, which
``torch.hub`` checks, and those are listed as ``sha256_prefix``. Whatever file you use, genaf
records its sha256 in the run directory (``config.yaml`` and ``metrics.json``: ``encoder_files``),
so a run says exactly which bytes it started from.
"""

from __future__ import annotations

ZOO: list[dict] = [
    {
        "name": "solo-learn SimCLR ResNet-18 (CIFAR-10)",
        "spec": "solo:PATH/simclr-cifar10.ckpt",
        "source": "https://github.com/vturrisi/solo-learn (zoo/cifar.sh; pretrained-models table in the README)",
        "sha256": None,
    },
    {
        "name": "solo-learn BYOL ResNet-18 (CIFAR-10)",
        "spec": "solo:PATH/byol-cifar10.ckpt",
        "source": "https://github.com/vturrisi/solo-learn (zoo/cifar.sh)",
        "sha256": None,
    },
    {
        "name": "solo-learn SimCLR ResNet-18 (ImageNet-100)",
        "spec": "solo:PATH/simclr-imagenet100.ckpt",
        "source": "https://github.com/vturrisi/solo-learn (zoo/imagenet-100.sh)",
        "sha256": None,
    },
    {
        "name": "solo-learn BYOL ResNet-18 (ImageNet-100)",
        "spec": "solo:PATH/byol-imagenet100.ckpt",
        "source": "https://github.com/vturrisi/solo-learn (zoo/imagenet-100.sh)",
        "sha256": None,
    },
    {
        "name": "torchvision ResNet-18 (ImageNet-1k, supervised)",
        "spec": "torchvision:resnet18:PATH/resnet18-f37072fd.pth",
        "source": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "sha256": None,
        "sha256_prefix": "f37072fd",
    },
    {
        "name": "torchvision ResNet-50 (ImageNet-1k V1, supervised)",
        "spec": "torchvision:resnet50:PATH/resnet50-0676ba61.pth",
        "source": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "sha256": None,
        "sha256_prefix": "0676ba61",
    },
    {
        "name": "DINO ViT-S/16",
        "spec": "timm:vit_small_patch16_224.dino[:PATH]  or  hf:facebook/dino-vits16",
        "source": "https://github.com/facebookresearch/dino; https://huggingface.co/timm/vit_small_patch16_224.dino",
        "sha256": None,
    },
    {
        "name": "DINOv2 ViT-S/14",
        "spec": "timm:vit_small_patch14_dinov2.lvd142m[:PATH]  or  hf:facebook/dinov2-small",
        "source": "https://github.com/facebookresearch/dinov2; https://huggingface.co/facebook/dinov2-small",
        "sha256": None,
    },
    {
        "name": "DINOv2 ViT-S/14 with 4 registers",
        "spec": "timm:vit_small_patch14_reg4_dinov2.lvd142m[:PATH]  or  hf:facebook/dinov2-with-registers-small",
        "source": "https://github.com/facebookresearch/dinov2; https://huggingface.co/facebook/dinov2-with-registers-small",
        "sha256": None,
    },
    {
        "name": "DINOv3 ViT-S/16 (LVD-1689M)",
        "spec": "timm:vit_small_patch16_dinov3.lvd1689m[:PATH]  or  hf:facebook/dinov3-vits16-pretrain-lvd1689m",
        "source": "https://github.com/facebookresearch/dinov3 (gated download; licence terms apply)",
        "sha256": None,
    },
    {
        "name": "MAE ViT-B/16",
        "spec": "timm:vit_base_patch16_224.mae[:PATH]",
        "source": "https://github.com/facebookresearch/mae; https://huggingface.co/timm/vit_base_patch16_224.mae",
        "sha256": None,
    },
    {
        "name": "CLIP ViT-B/32 image tower (OpenAI)",
        "spec": "timm:vit_base_patch32_clip_224.openai[:PATH]  or  hf:openai/clip-vit-base-patch32",
        "source": "https://github.com/openai/CLIP; https://huggingface.co/openai/clip-vit-base-patch32",
        "sha256": None,
    },
    {
        "name": "CLIP ViT-B/16 image tower (OpenAI)",
        "spec": "timm:vit_base_patch16_clip_224.openai[:PATH]  or  hf:openai/clip-vit-base-patch16",
        "source": "https://github.com/openai/CLIP; https://huggingface.co/openai/clip-vit-base-patch16",
        "sha256": None,
    },
]


def zoo_rows() -> list[dict]:
    """The zoo with ``sha256`` spelled out for printing ('not published' where no source states it)."""
    rows = []
    for entry in ZOO:
        row = dict(entry)
        if row.get("sha256") is None:
            prefix = row.get("sha256_prefix")
            row["sha256"] = (
                f"not published (file name carries the prefix {prefix}, checked by torch.hub)"
                if prefix
                else "not published"
            )
        rows.append(row)
    return rows


__all__ = ["ZOO", "zoo_rows"]
