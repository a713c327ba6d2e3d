"""Fréchet distance between feature distributions (FID with a pluggable feature extractor).

FID (Heusel et al. 2017) is d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between
Gaussians fitted to features of real and generated images. The standard extractor is
Inception-v3's pool3 layer; its weights are not downloaded here: pass any callable mapping an
image batch to (N, D) features (e.g. a locally loaded Inception or DINO network).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from scipy import linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)); a tiny ridge is added when S1 S2 is singular."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    covmean = np.real(covmean)  # rounding leaves a negligible imaginary part
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def extract(images: Iterable[torch.Tensor], extractor: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Features of image batches, concatenated: (N, D) float64."""
    with torch.no_grad():
        return np.concatenate([extractor(batch).double().cpu().numpy() for batch in images])


def fid(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor],
        extractor: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """FID between two streams of image batches under `extractor`."""
    return frechet_distance(*gaussian_stats(extract(real, extractor)), *gaussian_stats(extract(fake, extractor)))
