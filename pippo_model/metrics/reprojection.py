"""Reprojection error (RE): Pippo's 3D-consistency metric for views with known cameras.

For pairs of views (each view paired with a near neighbour by camera-centre distance, through
a Hungarian assignment), match features, triangulate every match with the KNOWN cameras (linear
DLT, Hartley & Zisserman §12.2), reproject the 3D point into both views and take the mean L2
pixel distance to the matched points; average over pairs; report also as % of max(H, W).
Multi-view-consistent images with correct cameras give ~0; the same number on ground-truth
views is the metric's noise floor (matching and rasterisation noise).

Improvements over the released script: pairs by camera centres o = -R^T t (not by t), outlier
rejection (RANSAC on the epipolar constraint, which uses no camera so it cannot hide a camera
error), a pluggable matcher that works offline (SIFT), and an exact matcher for synthetic data.

Cameras are mappings with "K" (3x3), "R" (3x3), "t" (3,): x_cam = R X + t, OpenCV pixel centres.
Images are (H, W, 3) uint8 arrays or (3, H, W) float tensors in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


class Matcher(Protocol):
    def __call__(self, i: int, j: int, image_i: np.ndarray, image_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Corresponding pixel positions (N, 2) [x, y] in views i and j."""


@dataclass
class ReprojectionResult:
    re_px: float  # mean over pairs of the mean reprojection error (pixels)
    re_pct: float  # re_px as % of max(H, W)
    pairs: int  # pairs that had enough matches to count
    per_pair: dict[tuple[int, int], float] = field(default_factory=dict)
    matches: dict[tuple[int, int], int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"re_pct": self.re_pct, "re_px": self.re_px, "pairs": self.pairs}


def to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from a uint8 array or a (3, H, W) float tensor/array in [-1, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.ndim == 3 and image.shape[0] == 3:
        image = image.transpose(1, 2, 0)
    return np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def camera_centre(cam: Mapping) -> np.ndarray:
    """o = -R^T t (SPEC §4)."""
    return -np.asarray(cam["R"], np.float64).T @ np.asarray(cam["t"], np.float64)


def pair_views(cameras: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Each view gets a distinct partner minimising the total camera-centre distance
    (Hungarian assignment on the distance matrix, self-pairs forbidden); unordered, deduplicated."""
    if len(cameras) < 2:
        return []
    centres = np.stack([camera_centre(c) for c in cameras])
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(dist, 1e18)
    rows, cols = linear_sum_assignment(dist)
    return sorted({(int(min(i, j)), int(max(i, j))) for i, j in zip(rows, cols)})


def project(cam: Mapping, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 2) and depths (N,) of world points X (N, 3): x ~ K (R X + t)."""
    xc = X @ np.asarray(cam["R"], np.float64).T + np.asarray(cam["t"], np.float64)
    uvw = xc @ np.asarray(cam["K"], np.float64).T
    return uvw[:, :2] / uvw[:, 2:3], xc[:, 2]


def triangulate(cam_i: Mapping, cam_j: Mapping, x_i: np.ndarray, x_j: np.ndarray) -> np.ndarray:
    """Linear DLT triangulation (H&Z eq. 12.2) of matches (N, 2), (N, 2) -> (N, 3).

    Done in normalised image coordinates (K^-1 x, cameras [R | t]), which conditions the 4x4
    system as Hartley's normalisation would."""
    rows = []
    for cam, x in ((cam_i, x_i), (cam_j, x_j)):
        P = np.hstack([np.asarray(cam["R"], np.float64), np.asarray(cam["t"], np.float64)[:, None]])
        xn = np.hstack([x, np.ones((len(x), 1))]) @ np.linalg.inv(np.asarray(cam["K"], np.float64)).T
        rows += [xn[:, 0:1] * P[2] - P[0], xn[:, 1:2] * P[2] - P[1]]  # x (p3 X) - (p1 X) = 0
    A = np.stack(rows, axis=1)  # (N, 4, 4)
    X = np.linalg.svd(A)[2][:, -1]  # null vector: right singular vector of the smallest value
    return X[:, :3] / X[:, 3:4]


def pair_error(cam_i: Mapping, cam_j: Mapping, x_i: np.ndarray, x_j: np.ndarray) -> tuple[float, int]:
    """Mean over matches of the mean (over the two views) L2 reprojection error; points that
    triangulate behind a camera are dropped (they cannot be seen: a failed match)."""
    X = triangulate(cam_i, cam_j, x_i, x_j)
    u_i, z_i = project(cam_i, X)
    u_j, z_j = project(cam_j, X)
    ok = (z_i > 0) & (z_j > 0) & np.isfinite(X).all(axis=1)
    err = 0.5 * (np.linalg.norm(u_i - x_i, axis=1) + np.linalg.norm(u_j - x_j, axis=1))
    return (float(err[ok].mean()) if ok.any() else float("nan")), int(ok.sum())


def reprojection_error(images: Sequence, cameras: Sequence[Mapping], matcher: Matcher | None = None,
                       min_matches: int = 16) -> ReprojectionResult:
    """RE of `images` under `cameras` (same order); `matcher` defaults to SIFT + RANSAC.

    Pairs with fewer than `min_matches` surviving matches are skipped: with few matches RANSAC
    cannot tell outliers from inliers and one bad pair would dominate the mean."""
    if len(images) != len(cameras):
        raise ValueError(f"{len(images)} images but {len(cameras)} cameras")
    matcher = matcher or SiftMatcher()
    images = [to_uint8(im) for im in images]
    size = max(max(im.shape[:2]) for im in images)
    per_pair, counts = {}, {}
    for i, j in pair_views(cameras):
        x_i, x_j = matcher(i, j, images[i], images[j])
        if len(x_i) < min_matches:
            continue
        err, n = pair_error(cameras[i], cameras[j], np.asarray(x_i, np.float64), np.asarray(x_j, np.float64))
        if n >= min_matches:
            per_pair[(i, j)], counts[(i, j)] = err, n
    if not per_pair:
        raise ValueError("no pair of views had enough matches to measure the reprojection error")
    re_px = float(np.mean(list(per_pair.values())))
    return ReprojectionResult(re_px, 100.0 * re_px / size, len(per_pair), per_pair, counts)


def reprojection_report(generated: Sequence, ground_truth: Sequence, cameras: Sequence[Mapping],
                        matcher: Matcher | None = None) -> dict:
    """RE of generated views next to the noise floor: the same measurement on ground truth."""
    gen = reprojection_error(generated, cameras, matcher)
    floor = reprojection_error(ground_truth, cameras, matcher)
    return {**gen.as_dict(), "noise_floor_pct": floor.re_pct, "noise_floor_px": floor.re_px}


class SiftMatcher:
    """OpenCV SIFT, Lowe's ratio test, then RANSAC on the fundamental matrix (epipolar
    constraint x_j^T F x_i = 0 estimated from the matches alone). Runs offline, no weights."""

    def __init__(self, ratio: float = 0.7, ransac_px: float = 1.0, max_features: int = 8000):
        self.ratio, self.ransac_px, self.max_features = ratio, ransac_px, max_features

    def __call__(self, i, j, image_i, image_j):
        import cv2

        sift = cv2.SIFT_create(nfeatures=self.max_features)
        kp_i, d_i = sift.detectAndCompute(cv2.cvtColor(image_i, cv2.COLOR_RGB2GRAY), None)
        kp_j, d_j = sift.detectAndCompute(cv2.cvtColor(image_j, cv2.COLOR_RGB2GRAY), None)
        empty = np.zeros((0, 2))
        if d_i is None or d_j is None or len(kp_i) < 2 or len(kp_j) < 2:
            return empty, empty
        pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d_i, d_j, k=2)
        good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < self.ratio * n.distance]
        if len(good) < 8:
            return empty, empty
        x_i = np.float64([kp_i[m.queryIdx].pt for m in good])
        x_j = np.float64([kp_j[m.trainIdx].pt for m in good])
        _, inliers = cv2.findFundamentalMat(x_i, x_j, cv2.FM_RANSAC, self.ransac_px, 0.999, 5000)
        if inliers is None:
            return empty, empty
        keep = inliers.ravel().astype(bool)
        return x_i[keep], x_j[keep]


class ExactMatcher:
    """Ground-truth correspondences for synthetic data: every `stride`-th pixel of view i that
    sees the surface (world point known) is projected with the TRUE camera of view j and kept
    if it lands inside view j and is not occluded there (view j sees the same point)."""

    def __init__(self, points: Sequence[np.ndarray], cameras: Sequence[Mapping], stride: int = 4,
                 tolerance: float = 0.01):
        self.points, self.cameras = points, cameras
        self.stride, self.tolerance = stride, tolerance

    def __call__(self, i, j, image_i=None, image_j=None):
        pts = np.asarray(self.points[i], np.float64)[:: self.stride, :: self.stride]
        rows, cols = np.nonzero(np.isfinite(pts).all(axis=-1))
        X = pts[rows, cols]
        uv, z = project(self.cameras[j], X)
        h, w = np.asarray(self.points[j]).shape[:2]
        c, r = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
        inside = (z > 0) & (c >= 0) & (c < w) & (r >= 0) & (r < h)
        seen = np.full(len(X), np.inf)
        seen[inside] = np.linalg.norm(np.asarray(self.points[j], np.float64)[r[inside], c[inside]] - X[inside], axis=1)
        keep = inside & (seen < self.tolerance)  # NaN (background there) compares False
        x_i = np.stack([cols * self.stride, rows * self.stride], axis=1).astype(np.float64)[keep]
        return x_i, uv[keep]
