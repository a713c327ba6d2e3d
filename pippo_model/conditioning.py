"""Conditioning modules: reference encoder, camera MLP (mid stage), ControlMLP (post stage).

Every module that a later stage adds ends in a zero-initialised layer, so adding it to a trained
model leaves that model's output unchanged at step 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ModelConfig
from .embeddings import Patchify, TimestepEmbedder, resize_grid, sincos_2d


def camera_vectors(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Normalised poses for the camera MLP: (..., V, 3, 3), (..., V, 3) -> (..., V, 16).

    World-to-camera [R | t; 0 0 0 1] in the sample's world frame (centred on the subject by
    dataprep), flattened row-major, with t divided by the mean camera distance of the sample so
    the embedding does not depend on the capture's scale. No reference camera is needed: the
    reference view gets a learned canonical camera (CameraMLP.reference).
    """
    centres = -torch.einsum("...ji,...j->...i", R, t)  # o = -R^T t
    dist = centres.norm(dim=-1).mean(dim=-1)[..., None, None].clamp_min(1e-8)
    m = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    m[..., :3, :3] = R
    m[..., :3, 3] = t / dist
    m[..., 3, 3] = 1.0
    return m.flatten(-2)


class ReferenceEncoder(nn.Module):
    """Reference photo latent -> tokens: own patchify and sin-cos-initialised position table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid = cfg.grid_size
        self.patch_size = cfg.patch_size
        self.patchify = Patchify(cfg.latent_channels, cfg.dim, cfg.patch_size)
        self.pos_embed = nn.Parameter(sincos_2d(cfg.dim, self.grid, self.grid))

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/p * w/p, D)."""
        h, w = reference.shape[-2] // self.patch_size, reference.shape[-1] // self.patch_size
        return self.patchify(reference) + resize_grid(self.pos_embed, self.grid, h, w)


class GEGLUBlock(nn.Module):
    """Pre-norm residual feed-forward with a GELU-gated linear unit (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return x + self.proj_out(a * F.gelu(gate))


class CameraMLP(nn.Module):
    """16-vector per view -> LayerNorm -> Linear(16->H) -> GEGLU block -> zero Linear(H->dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, cfg.camera_hidden),
                                 GEGLUBlock(cfg.camera_hidden), nn.Linear(cfg.camera_hidden, cfg.dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        # canonical camera of the reference view: the input photo's camera is never known
        self.reference = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, cameras: torch.Tensor) -> torch.Tensor:
        """(B, V, 16) -> (B, V, D)."""
        return self.net(cameras)


class Siren(nn.Module):
    """Sine MLP (Sitzmann et al. 2020): y = sin(w0 * (W x + b)) per layer, with SIREN's init
    (first layer U(-1/n, 1/n), later U(-sqrt(6/n)/w0, sqrt(6/n)/w0)) so activations stay
    arcsine-distributed. Encodes the 6 Plücker channels per pixel."""

    def __init__(self, channels: tuple[int, ...], w0: float = 30.0):
        super().__init__()
        self.w0 = w0
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(channels[:-1], channels[1:]))
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                n = layer.in_features
                bound = 1.0 / n if i == 0 else math.sqrt(6.0 / n) / w0
                layer.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sin(self.w0 * layer(x))
        return x


class ZeroControlBlock(nn.Module):
    """control_l = Linear(h * (1 + scale) + shift), (shift, scale) from the ControlMLP's own
    timestep embedding; both layers zero-initialised so the control starts at exactly 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, dim)
        for layer in (self.adaLN[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(h * (1 + scale[:, None]) + shift[:, None])


class ControlMLP(nn.Module):
    """Per-pixel controls (Plücker rays, spatial anchor, x_t) -> one control per DiT layer.

    Per view, at latent resolution: [anchor latent (C) | SIREN(Plücker) bilinearly resampled
    (32) | noisy latent x_t (C)] -> Conv3x3 -> SiLU -> stride-p Conv3x3 (one control token per
    DiT token) -> SiLU -> Conv1x1 -> LayerNorm, then one ZeroControlBlock per DiT layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, c = cfg.dim, cfg.latent_channels
        self.siren = Siren((6,) + tuple(cfg.siren_channels), cfg.siren_w0)
        in_channels = c + cfg.siren_channels[-1] + c
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, dim, 3, padding=1), nn.SiLU(),
            nn.Conv2d(dim, 2 * dim, 3, stride=cfg.patch_size, padding=1), nn.SiLU(),
            nn.Conv2d(2 * dim, dim, 1))
        for layer in self.encoder:
            if isinstance(layer, nn.Conv2d):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(ZeroControlBlock(dim) for _ in range(cfg.depth))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, plucker: torch.Tensor,
                anchor: torch.Tensor) -> list[torch.Tensor]:
        """x_t, anchor (B, V, C, h, w); plucker (B, V, 6, H', W') at any resolution; t (B,).
        Returns depth x (B, V * h/p * w/p, D)."""
        b, v, _, h, w = x_t.shape
        rays = rearrange(plucker, "b v c y x -> (b v) y x c").to(x_t.dtype)
        rays = rearrange(self.siren(rays), "n y x c -> n c y x")
        if rays.shape[-2:] != (h, w):
            rays = F.interpolate(rays, size=(h, w), mode="bilinear", align_corners=False,
                                 antialias=rays.shape[-2] > h)
        feats = torch.cat([rearrange(anchor, "b v c y x -> (b v) c y x"), rays,
                           rearrange(x_t, "b v c y x -> (b v) c y x")], dim=1)
        tokens = self.norm(rearrange(self.encoder(feats), "n d y x -> n (y x) d"))
        tokens = rearrange(tokens, "(b v) n d -> b (v n) d", b=b)
        c = self.t_embedder(t)
        return [block(tokens, c) for block in self.blocks]
