"""Joint multi-view self-attention and Pippo's attention biasing.

Every block attends over all tokens of all views at once (targets + reference), so the number of
tokens N grows with the number of views. Softmax entropy grows with log N; when sampling far more
views than were trained, attention becomes too diffuse. Attention biasing (Pippo eq. 4, after
Jin et al. 2023, "Training-free diffusion model adaptation to variable-sized text-to-image
synthesis") rescales the logits so the entropy stays as in training:

    scale = sqrt(gamma * log(N_cur) / log(N_train) / d_head)

With gamma = 1 and N_cur = N_train this is the usual 1/sqrt(d_head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_scale(head_dim: int, n_cur: int | None = None, n_train: int | None = None,
                    gamma: float | None = None) -> float:
    """Softmax scale; the default 1/sqrt(d) unless a growth factor gamma is asked for."""
    if gamma is None:
        return 1.0 / math.sqrt(head_dim)
    if not n_cur or not n_train or n_cur < 2 or n_train < 2:
        raise ValueError("attention biasing needs token counts n_cur, n_train >= 2")
    # Pippo eq. 4: sqrt(gamma * log N_cur / log N_train / d)
    return math.sqrt(gamma * math.log(n_cur) / math.log(n_train) / head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v on (B, heads, N, d); fused kernel (flash / memory-efficient / math)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v with an explicit N x N matrix (the tests' and benches' reference)."""
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(logits.softmax(dim=-1), v)
