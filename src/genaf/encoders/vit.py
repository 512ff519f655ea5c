"""genaf's own small Vision Transformer, in plain torch, with timm's module names.

``vit-tiny`` (patch 4, width 96, depth 4, 3 heads, MLP ratio 4; about 0.45 M parameters) is made
for 28/32-pixel images. Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.norm2``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``), so the generic layer
logic (attack taps, stage 2's units) treats it like a timm ViT.

The feature is the final-norm CLS token (``pool='cls'``, default) or the mean of the patch tokens
(``pool='mean'``). The learned position embedding is stored for the grid of ``input_size``; other
image sizes interpolate it bicubically (as timm's ``dynamic_img_size``). An image side that is not
a multiple of the patch size is refused, naming the nearest valid sizes.

Metadata keys (an encoder file's ``meta``): ``arch`` (a key of :data:`VIT_ARCHS`), optionally
overriding ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``pool``;
``in_chans`` and ``input_size`` as for every encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError, unknown

VIT_ARCHS: dict[str, dict] = {
    "vit-tiny": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0},
    "vit-small": {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0},
}
POOLS = ("cls", "mean")
VIT_META_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pool")


def is_vit_arch(arch: object) -> bool:
    return isinstance(arch, str) and arch in VIT_ARCHS


def nearest_valid_sizes(size: int, patch: int) -> list[int]:
    """The multiples of ``patch`` just below and above ``size`` (at least one patch)."""
    lo = (size // patch) * patch
    return sorted({max(patch, lo), lo + patch})


def check_image_size(h: int, w: int, patch: int, what: str = "this ViT") -> None:
    """Refuse an image side that is not a positive multiple of the patch size (one line)."""
    bad = [s for s in (h, w) if s < patch or s % patch]
    if bad:
        sizes = " or ".join(str(s) for s in nearest_valid_sizes(bad[0], patch))
        raise SpecError(
            f"{what} takes images whose side is a multiple of its patch size {patch}, got {h}x{w}; "
            f"use {sizes} (e.g. --image-size {nearest_valid_sizes(bad[0], patch)[-1]})"
        )


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p · W/p, D) with one strided convolution ``proj``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise SpecError(f"ViT embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTBackbone(nn.Module):
    """A ViT trunk returning (N, embed_dim) features (CLS token or mean of patch tokens)."""

    def __init__(
        self,
        arch: str = "vit-tiny",
        input_size: int = 28,
        in_chans: int = 3,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if arch not in VIT_ARCHS:
            raise unknown("ViT arch", arch, VIT_ARCHS)
        cfg = dict(VIT_ARCHS[arch])
        given = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
        cfg.update({k: int(v) for k, v in given.items() if v is not None})
        if mlp_ratio is not None:
            cfg["mlp_ratio"] = float(mlp_ratio)
        if pool not in POOLS:
            raise unknown("ViT pool", pool, POOLS)
        if min(cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) < 1:
            raise SpecError(f"ViT sizes must be positive, got {cfg}")
        self.arch, self.pool = arch, pool
        self.patch_size, self.embed_dim = cfg["patch_size"], cfg["embed_dim"]
        self.depth, self.num_heads, self.mlp_ratio = cfg["depth"], cfg["num_heads"], cfg["mlp_ratio"]
        self.input_size = int(input_size)
        check_image_size(self.input_size, self.input_size, self.patch_size, f"{arch} (input_size)")
        self.grid = self.input_size // self.patch_size
        d = self.embed_dim
        self.patch_embed = PatchEmbed(self.patch_size, in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, d))
        self.blocks = nn.Sequential(*[Block(d, self.num_heads, self.mlp_ratio) for _ in range(self.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.feature_dim = d
        if self.pos_embed.is_meta:
            return  # built to be measured only (check_backbone); initialising on meta imports torch._dynamo
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_input_size(self, h: int, w: int) -> None:
        """Refuse (one line) an image size this ViT cannot take: a side not a multiple of the patch."""
        check_image_size(int(h), int(w), self.patch_size, self.arch)

    def meta(self) -> dict:
        """The architecture fields an encoder file records."""
        return {
            "arch": self.arch,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "pool": self.pool,
        }

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """The (1, 1 + gh·gw, D) position embedding for a gh × gw patch grid (bicubic resampling
        of the stored grid when it differs; the CLS entry is kept)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid_pos.shape[-1]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised images -> (N, 1 + H/p · W/p, D) final-norm tokens."""
        h, w = x.shape[-2:]
        self.check_input_size(h, w)
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(len(x), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding(h // self.patch_size, w // self.patch_size)
        return self.norm(self.blocks(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


def build_vit(meta: dict) -> ViTBackbone:
    """A :class:`ViTBackbone` from an encoder's metadata (``arch`` plus optional overrides)."""
    return ViTBackbone(
        arch=meta["arch"],
        input_size=int(meta.get("input_size", 28)),
        in_chans=int(meta.get("in_chans", 3)),
        patch_size=meta.get("patch_size"),
        embed_dim=meta.get("embed_dim"),
        depth=meta.get("depth"),
        num_heads=meta.get("num_heads"),
        mlp_ratio=meta.get("mlp_ratio"),
        pool=str(meta.get("pool", "cls")),
    )


def vit_meta(arch: str, input_size: int, **overrides) -> dict:
    """The architecture part of an encoder's metadata for a genaf ViT (normalisation not included)."""
    if arch not in VIT_ARCHS:
        raise unknown("ViT arch", arch, VIT_ARCHS)
    meta = {"arch": arch, "in_chans": 3, "input_size": int(input_size), **VIT_ARCHS[arch], "pool": "cls"}
    meta.update({k: v for k, v in overrides.items() if v is not None})
    return meta


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "POOLS",
    "VIT_ARCHS",
    "ViTBackbone",
    "build_vit",
    "check_image_size",
    "count_parameters",
    "is_vit_arch",
    "nearest_valid_sizes",
    "vit_meta",
]
