"""Token embeddings: patchify, sin-cos position tables, timestep embedding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] with geometric frequencies 1/10000^(2i/dim) (Vaswani)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """(height*width, dim): half the channels encode the row, half the column (MAE / DiT)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


def resize_grid(table: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """Bilinearly resample a (grid*grid, D) position table to (height*width, D) for other sizes."""
    if (height, width) == (grid, grid):
        return table
    img = rearrange(table, "(h w) d -> 1 d h w", h=grid)
    img = F.interpolate(img, size=(height, width), mode="bilinear", align_corners=False)
    return rearrange(img, "1 d h w -> (h w) d")


class Patchify(nn.Module):
    """PixelUnshuffle(p) -> 1x1 conv -> LayerNorm without affine: one token per p x p patch."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(patch_size)
        self.proj = nn.Conv2d(in_channels * patch_size ** 2, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, dim)."""
        return self.norm(rearrange(self.proj(self.unshuffle(x)), "n d h w -> n (h w) d"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer) diffusion step t -> MLP (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        feats = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
