"""Discrete DDPM with the cosine schedule, and the training loss.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): alpha_bar_t = prod_{i<=t} (1 - beta_i),
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t in {0, ..., T-1}.

Training batch (`training_loss`), all in model space (see pippo_model.model for `cond`):

    "views"      (B, V, C, h, w)   clean target views (the only tensors that get noised)
    "reference"  (B, C, h, w)      and, per stage, "cameras", "plucker", "anchor", "view_ids"
"""
from __future__ import annotations

import math

import torch
from torch import nn


class CosineSchedule(nn.Module):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2) (Nichol & Dhariwal
    eq. 17), realised through betas beta_t = 1 - f(t+1)/f(t) clipped at 0.999 (their §3.2)."""

    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        super().__init__()
        self.timesteps = timesteps

        def f(t):
            return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(timesteps)], dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, ..., 1) to broadcast against `like`."""
        out = values.to(t.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (DDPM eq. 4)."""
        a = self._coef(self.alpha_bar, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, §4)."""
        a = self._coef(self.alpha_bar, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def eps_and_x0(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor, prediction: str):
        """(eps_hat, x0_hat) from the network output, for either parameterisation."""
        a = self._coef(self.alpha_bar, t, x_t)
        if prediction == "eps":
            eps = pred
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        else:  # v: x_0 = sqrt(a) x_t - sqrt(1-a) v ; eps = sqrt(1-a) x_t + sqrt(a) v
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * pred
            eps = (1 - a).sqrt() * x_t + a.sqrt() * pred
        return eps, x0


def conditions(batch: dict) -> dict:
    """The conditioning part of a training batch."""
    return {k: v for k, v in batch.items() if k != "views"}


def training_loss(model: nn.Module, schedule: CosineSchedule, batch: dict,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the network output and eps (or v) on the target views only (Ho et al. eq. 14).

    One t ~ U{0..T-1} per sample, shared by all its views; CFG dropout masks are drawn while the
    model is in training mode. The reference is passed clean: it is never noised.
    """
    x0 = batch["views"]
    b = x0.shape[0]
    t = torch.randint(0, schedule.timesteps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.q_sample(x0, t, noise)
    drop = model.sample_drop(b, x0.device, generator) if model.training else None
    pred = model(x_t, t, conditions(batch), drop)
    target = noise if model.cfg.prediction == "eps" else schedule.v_target(x0, t, noise)
    return torch.mean((pred.float() - target.float()) ** 2)
