"""Plain ViT backbone (ViT-B/16 in the paper) returning the last block's patch tokens as a feature map.

Layout follows the AugReg / timm ViT: patch embedding conv, class token, learned absolute position
embeddings, pre-norm blocks (LayerNorm eps 1e-6, fused qkv with bias, MLP x4 with GELU), drop path,
final LayerNorm. ``forward`` returns the patch tokens after the final norm as (B, D, H/16, W/16).

Position embeddings are stored for a reference grid (``pos_grid``, default 32x32 = 512/16, the
training crop of the original's MMSegmentation config, which also resized the 24x24 AugReg grid to
its ``img_size`` once at load time) and resized bicubically (align_corners=False, no antialias, as
MMSegmentation's ``resize_pos_embed``) to the input's grid whenever the two differ.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH_SIZE = 16
DEFAULT_POS_GRID = 32  # 512 px training crops / 16


def resize_pos_grid(pos: Tensor, new_hw: tuple[int, int]) -> Tensor:
    """Bicubically resize a (1, gh*gw, D) patch position grid (no class token) to ``new_hw``.

    The stored grid must be square (AugReg's 24x24, ours ``pos_grid``x``pos_grid``).
    """
    n, d = pos.shape[1], pos.shape[2]
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"position grid of {n} tokens is not square")
    if (g, g) == tuple(new_hw):
        return pos
    grid = pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_hw, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], d)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval or p=0)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # rows: [query; key; value], each head-major
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        # Exact (erf) GELU as in the original (MMSegmentation/timm port); AugReg itself trained with Flax's
        # tanh approximation: a difference of < 1e-3 per activation that the port has always ignored.
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path: nn.Module = DropPath(drop_path)  # nn.Identity where a caller turns it off

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT returning the last block's patch tokens (after the final norm) as (B, D, H/16, W/16)."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        *,
        patch_size: int = PATCH_SIZE,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        pos_grid: int = DEFAULT_POS_GRID,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))  # [cls, grid...]
        rates = torch.linspace(0, drop_path, depth).tolist()  # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, images: Tensor) -> Tensor:
        """All tokens after the final norm, (B, 1 + h*w, D): the class token first (classification
        pretraining reads it), then the patch tokens in row-major order."""
        b, _, hh, ww = images.shape
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"input size {hh}x{ww} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        patch_pos = resize_pos_grid(pos[:, 1:], (h, w))
        cls = self.cls_token.expand(b, -1, -1) + pos[:, :1]
        x = torch.cat([cls, x + patch_pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.tokens(images)
        return x[:, 1:].transpose(1, 2).reshape(images.shape[0], self.embed_dim, h, w)


VIT_BUILDERS: dict[str, Callable[..., VisionTransformer]] = {
    "vit_tiny": partial(VisionTransformer, 192, 12, 3),
    "vit_small": partial(VisionTransformer, 384, 12, 6),
    "vit_base": partial(VisionTransformer, 768, 12, 12),
    "vit_mini": partial(VisionTransformer, 192, 4, 3),  # vit_tiny with 4 blocks: `larvseg demo` on 2 CPU cores
}


def build_vit(arch: str, drop_path: float = 0.0, pos_grid: int = DEFAULT_POS_GRID) -> VisionTransformer:
    if arch not in VIT_BUILDERS:
        raise KeyError(f"unknown ViT arch {arch!r}; choose one of {sorted(VIT_BUILDERS)}")
    return VIT_BUILDERS[arch](drop_path=drop_path, pos_grid=pos_grid)
