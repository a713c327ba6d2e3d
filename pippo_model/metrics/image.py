"""Per-image fidelity: PSNR and SSIM on (N, C, H, W) tensors in a known value range."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per image 10 log10(R^2 / MSE); default range 2 for images in [-1, 1]."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def _gaussian(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per image mean SSIM (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window (sigma 1.5),
    computed per channel over valid positions, averaged over channels."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian(window, sigma, c, x.device)

    def blur(z):
        return F.conv2d(z, w, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    # SSIM = (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)
