"""Parameter counts and training FLOPs per sample (for MFU), from the config alone.

FLOPs count multiply-adds as 2 and include only matmuls, convolutions and attention (what
accelerators' peak numbers measure). A training step costs ~3x the forward: the backward pass
needs two matmuls (input and weight gradients) per forward matmul (Kaplan et al. 2020, §2.1).
The frozen VAE is excluded: it is not part of the trained model.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .model import build_model

FREQ_DIM = 256  # sinusoidal timestep features (embeddings.TimestepEmbedder)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """{"total": n, "<module>": n, ...}: counted on the meta device, so no memory is used."""
    model = build_model(cfg, "meta")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    counts = {k: v for k, v in counts.items() if v}
    return {"total": sum(counts.values()), **counts}


def _timestep_mlp(d: int) -> float:
    return 2.0 * (FREQ_DIM * d + d * d)


def forward_flops(cfg: ModelConfig, views: int | None = None, plucker_hw: tuple[int, int] | None = None) -> float:
    """Forward matmul/conv/attention FLOPs of one sample with `views` targets (default cfg.views)
    at cfg.resolution, Plücker maps of size `plucker_hw` (default: the image resolution)."""
    v = views or cfg.views
    d, c, p = cfg.dim, cfg.latent_channels, cfg.patch_size
    hidden = int(cfg.dim * cfg.mlp_ratio)
    n = cfg.tokens_per_view
    seq = (v + 1) * n  # the reference counts as one more view
    patch_in = c * p * p
    # generator: patchify targets + reference (the reference encoder's patchify), timestep MLP
    total = 2.0 * seq * patch_in * d + _timestep_mlp(d)
    per_block = (2.0 * seq * d * (3 * d + hidden)  # fused q, k, v, mlp-in projection
                 + 2.0 * seq * d * d  # attention output projection
                 + 2.0 * seq * hidden * d  # mlp output projection
                 + 4.0 * seq * seq * d  # q k^T and attn @ v, all heads
                 + 2.0 * d * 6 * d)  # adaLN modulation
    total += cfg.depth * per_block
    total += 2.0 * v * n * d * patch_in + 2.0 * d * 2 * d  # final layer (targets only) + its adaLN
    if cfg.camera_mlp:
        h = cfg.camera_hidden
        total += 2.0 * v * (16 * h + h * 4 * h + 2 * h * h + h * d)
    if cfg.control_mlp:
        hp, wp = plucker_hw or (cfg.resolution, cfg.resolution)
        ch = (6,) + tuple(cfg.siren_channels)
        total += 2.0 * v * hp * wp * sum(a * b for a, b in zip(ch[:-1], ch[1:]))
        lat = cfg.latent_size ** 2
        in_ch = 2 * c + ch[-1]
        total += 2.0 * v * (lat * in_ch * 9 * d + n * d * 9 * 2 * d + n * 2 * d * d)  # conv3x3, strided conv3x3, conv1x1
        total += _timestep_mlp(d) + cfg.depth * (2.0 * v * n * d * d + 2.0 * d * 2 * d)  # zero blocks
    return total


def training_flops_per_sample(cfg: ModelConfig) -> float:
    """~3x the forward FLOPs (forward + backward)."""
    return 3.0 * forward_flops(cfg)


def measured_forward_flops(cfg: ModelConfig, views: int | None = None) -> int:
    """The same count measured by torch's FLOP counter on a meta-device forward (no memory):
    on meta, attention decomposes into counted matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    v = views or cfg.views
    model = build_model(cfg, "meta").eval()
    h, c = cfg.latent_size, cfg.latent_channels
    with torch.device("meta"):
        x = torch.empty(1, v, c, h, h)
        cond = {"reference": torch.empty(1, c, h, h), "cameras": torch.empty(1, v, 16),
                "plucker": torch.empty(1, v, 6, cfg.resolution, cfg.resolution),
                "anchor": torch.empty(1, v, c, h, h)}
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, cond)
    return counter.get_total_flops()
