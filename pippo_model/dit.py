"""The multi-view diffusion transformer (the "generator").

Sequence (Pippo §3.2): every target view is patchified, gets a 2D position embedding (shared by
views), a per-view embedding and its camera embedding; the reference tokens (encoded elsewhere,
never noised) are appended as one more view. Each block runs ONE joint self-attention over all
(views + 1) x tokens; the reference tokens are dropped after the last block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, attention_scale
from .config import ModelConfig
from .embeddings import Patchify, TimestepEmbedder, resize_grid, sincos_1d, sincos_2d


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT §3.2): x * (1 + scale) + shift, per sample, broadcast over tokens (one fused op)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    """Parallel attention + MLP from one fused input projection (ViT-22B), QK-LayerNorm,
    adaLN-Zero on both branch outputs (shift, scale, gate each) from the timestep embedding.

    The gates start at 0, so a fresh block is the identity. The ControlMLP's per-layer control is
    added to the MLP branch output before its modulation and gate (Pippo §3.3).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.heads = heads
        self.hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.in_proj = nn.Linear(dim, 3 * dim + self.hidden)  # [q | k | v | mlp hidden]
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_out = nn.Linear(self.hidden, dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        for layer in (self.in_proj, self.attn_out, self.mlp_out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.adaLN[1].weight)  # adaLN-Zero: block = identity at init
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, scale: float,
                control: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) all tokens; c (B, D) timestep embedding; control (B, N_target, D) or None."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c).chunk(6, dim=1)
        dim = x.shape[-1]
        q, k, v, h = self.in_proj(self.norm(x)).split([dim, dim, dim, self.hidden], dim=-1)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        a = attention(self.q_norm(q), self.k_norm(k), v, scale)
        a = self.attn_out(rearrange(a, "b h n d -> b n (h d)"))
        m = self.mlp_out(F.gelu(h, approximate="tanh"))
        if control is not None:  # controls exist for target tokens only (the reference comes last)
            m[:, : control.shape[1]] += control  # in place: mlp_out's output is not saved for backward
        # x + g_a * adaLN(attn) + g_m * adaLN(mlp): parallel residual with zero-initialised gates
        x = torch.addcmul(x, gate_a[:, None], modulate(a, shift_a, scale_a))
        return torch.addcmul(x, gate_m[:, None], modulate(m, shift_m, scale_m))


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN (shift, scale) -> zero-initialised Linear to p*p*C: the prediction is 0 at init."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        for layer in (self.adaLN[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MultiViewDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim, grid = cfg.dim, cfg.grid_size
        self.patchify = Patchify(cfg.latent_channels, dim, cfg.patch_size)
        # learnable, sin-cos initialised 2D position table shared by all target views
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid, grid))
        # per-view embedding (the release has none: views were told apart by cameras only);
        # sin-cos initialised so rows never seen in training still differ
        self.view_embed = nn.Parameter(sincos_1d(dim, torch.arange(cfg.max_views)) * 0.02)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(dim, cfg.patch_size, cfg.latent_channels)

    def embed_views(self, x: torch.Tensor, view_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, V, C, h, w) -> (B, V, N, D) tokens with position and per-view embeddings."""
        b, v, _, h, w = x.shape
        p = self.cfg.patch_size
        tokens = rearrange(self.patchify(rearrange(x, "b v c h w -> (b v) c h w")), "(b v) n d -> b v n d", b=b)
        tokens = tokens + resize_grid(self.pos_embed, self.cfg.grid_size, h // p, w // p)
        if view_ids is None:
            if v > self.cfg.max_views:
                raise ValueError(f"{v} views exceed max_views={self.cfg.max_views}")
            view_ids = torch.arange(v, device=x.device).expand(b, v)
        return tokens + self.view_embed[view_ids][:, :, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, reference: torch.Tensor,
                camera: torch.Tensor | None = None, controls: list[torch.Tensor] | None = None,
                view_ids: torch.Tensor | None = None, gamma: float | None = None) -> torch.Tensor:
        """x (B, V, C, h, w) noisy targets; t (B,) one noise level per sample shared by its views;
        reference (B, N_ref, D) reference tokens; camera (B, V, D) camera embeddings;
        controls: one (B, V*N, D) per block. Returns (B, V, C, h, w)."""
        b, v, c_in, h, w = x.shape
        p = self.cfg.patch_size
        tokens = self.embed_views(x, view_ids)
        if camera is not None:
            tokens = tokens + camera[:, :, None]  # each view's camera embedding on all its tokens
        n_target = v * tokens.shape[2]
        seq = torch.cat([rearrange(tokens, "b v n d -> b (v n) d"), reference], dim=1)
        c = self.t_embedder(t)
        scale = attention_scale(self.cfg.head_dim, seq.shape[1], self.cfg.n_train_tokens, gamma)
        for i, block in enumerate(self.blocks):
            control = controls[i] if controls is not None else None
            if self.cfg.grad_checkpointing and torch.is_grad_enabled():
                seq = checkpoint(block, seq, c, scale, control, use_reentrant=False)
            else:
                seq = block(seq, c, scale, control)
        out = self.final(seq[:, :n_target], c)  # the reference tokens are dropped here
        return rearrange(out, "b (v y x) (p q c) -> b v c (y p) (x q)",
                         v=v, y=h // p, x=w // p, p=p, q=p, c=c_in)
