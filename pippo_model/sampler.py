"""DDIM sampling (Song et al. 2021) with classifier-free guidance and guidance rescale."""
from __future__ import annotations

import torch

from .diffusion import CosineSchedule


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced training steps, from T-1 down to 0."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must lie in [1, {timesteps}]")
    return torch.linspace(timesteps - 1, 0, steps).round().long().tolist()


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u) (Ho & Salimans eq. 6), optionally rescaled towards the standard
    deviation of eps_c to undo CFG's over-exposure (Lin et al. 2024, eqs. 15-16) with weight phi."""
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale > 0:
        dims = tuple(range(1, guided.ndim))
        ratio = eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


@torch.no_grad()
def ddim_sample(model, schedule: CosineSchedule, cond: dict, shape: tuple[int, ...], steps: int = 30,
                eta: float = 0.1, guidance: float = 1.0, guidance_drop: tuple[str, ...] | None = None,
                rescale: float = 0.0, gamma: float | None = None, clip: float | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_0 of `shape` = (B, V, C, h, w) given `cond` (see pippo_model.model).

    guidance != 1 runs the conditional and unconditional passes as one batch of 2B; the
    unconditional pass replaces the conditions in `guidance_drop` (default: all the model has)
    by their learned nulls. gamma: attention-biasing growth factor (more views than trained).
    clip: clamp x0_hat to [-clip, clip] and re-derive eps from it (Ho et al. / ADM
    "clip_denoised"; use 1 in pixel space): at t = T-1 x0_hat = (x - sqrt(1-a) eps_hat)/sqrt(a)
    amplifies eps errors by 1/sqrt(a_T-1) ~ 2e4.
    """
    device = cond["reference"].device
    dtype = next(model.parameters()).dtype
    x = noise if noise is not None else torch.randn(shape, device=device, dtype=dtype, generator=generator)
    b = x.shape[0]
    guided = guidance != 1.0
    if guided:
        names = guidance_drop if guidance_drop is not None else model.conditions
        off = torch.zeros(b, dtype=torch.bool, device=device)
        drop = {k: torch.cat([off, ~off]) for k in names}
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
    ts = ddim_timesteps(schedule.timesteps, steps)
    for i, t_now in enumerate(ts):
        t = torch.full((b,), t_now, device=device, dtype=torch.long)
        if guided:
            out = model(torch.cat([x, x]), torch.cat([t, t]), cond2, drop, gamma)
            eps_c, _ = schedule.eps_and_x0(x, t, out[:b], model.cfg.prediction)
            eps_u, _ = schedule.eps_and_x0(x, t, out[b:], model.cfg.prediction)
            eps = guide(eps_c, eps_u, guidance, rescale)
        else:
            eps, _ = schedule.eps_and_x0(x, t, model(x, t, cond, None, gamma), model.cfg.prediction)
        a_t = schedule.alpha_bar[t_now].item()
        a_prev = schedule.alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        # DDIM eq. 12: x0_hat from eps_hat, then step to t_prev with noise level sigma (eq. 16)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        direction = max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        x = a_prev ** 0.5 * x0 + direction
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
    return x
