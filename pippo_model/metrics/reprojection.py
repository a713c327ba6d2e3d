"""Reprojection error (RE): Pippo's 3D-consistency metric for views with known cameras.

For pairs of views that see the same side of the subject (below), match features, triangulate
every match with the KNOWN cameras (linear DLT, Hartley & Zisserman §12.2), reproject the 3D
point into both views and take the mean L2 pixel distance to the matched points; average over
pairs; report also as % of max(H, W). Multi-view-consistent images with correct cameras give ~0;
the same number on ground-truth views is the metric's noise floor (matching and rasterisation
noise).

Improvements over the released script:
- Pairs by viewing-direction overlap: the pairs that see the subject (the point the optical axes
  converge on) from the closest directions, i.e. see the same side of it, each view in at most
  `per_view` pairs. Camera-centre proximity fails on sparse rigs (8 cameras around a figure: a
  nearest centre may face another side) and pairing by t (the release) is not even a position.
- A wide-baseline matcher by default: SIFT, then ASIFT (Yu & Morel 2011, OpenCV's
  `cv2.AffineFeature`: SIFT on affine-warped copies simulating camera tilts) for pairs SIFT
  cannot match; features on grey and on each colour channel (a coloured texture can be flat in
  grey); ratio test + mutual nearest neighbours.
- Outlier rejection without cameras, so it cannot hide a camera error: RANSAC (MAGSAC++) on the
  epipolar constraint x_j^T F x_i = 0, and an a-contrario test of the pair (Moisan & Stival
  2004): the inlier count must be `significance` times what the same RANSAC finds on matches
  whose correspondence is destroyed by a random permutation (same keypoints, same layout). On a
  sparse rig, pairs that share little surface get only chance matches (of a repetitive texture,
  of a symmetric body: a wrong F fits them well); those pairs are dropped, not averaged.
- An exact matcher for synthetic data (ground-truth correspondences).

Cameras are mappings with "K" (3x3), "R" (3x3), "t" (3,): x_cam = R X + t, OpenCV pixel centres.
Images are (H, W, 3) uint8 arrays or (3, H, W) float tensors in [-1, 1].
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np


class Matcher(Protocol):
    def __call__(self, i: int, j: int, image_i: np.ndarray, image_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Corresponding pixel positions (N, 2) [x, y] in views i and j."""


class NotMeasurable(ValueError):
    """No pair of views could be measured: a result about the views, not a broken input."""


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


def optical_axis(cam: Mapping) -> np.ndarray:
    """The viewing direction in the world: R^T [0, 0, 1] (SPEC §4: +z looks forward)."""
    return np.asarray(cam["R"], np.float64)[2]


def fixation_point(cameras: Sequence[Mapping]) -> np.ndarray | None:
    """The point nearest to every optical axis in least squares, i.e. the subject the rig aims at:
    sum_i (I - a_i a_i^T)(p - o_i) = 0 (a_i the unit axis, o_i the centre). None when the axes
    are too close to parallel for it to be defined (a forward-facing rig)."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for cam in cameras:
        a = optical_axis(cam)
        P = np.eye(3) - np.outer(a, a)             # projects onto the plane normal to the axis
        A += P
        b += P @ camera_centre(cam)
    if np.linalg.eigvalsh(A)[0] < 1e-2 * len(cameras):   # axes within a few degrees of each other
        return None
    return np.linalg.solve(A, b)


def viewing_directions(cameras: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Per view, the direction it sees the subject from (unit (N, 3)) and whether it sees it at all
    (the fixation point in front of the camera). Without a fixation point: the optical axes."""
    axes = np.stack([optical_axis(c) for c in cameras])
    p = fixation_point(cameras)
    if p is None:
        return axes, np.ones(len(cameras), bool)
    to_p = p - np.stack([camera_centre(c) for c in cameras])
    dirs = to_p / np.maximum(np.linalg.norm(to_p, axis=1, keepdims=True), 1e-12)
    return dirs, np.einsum("nk,nk->n", dirs, axes) > 0


def pair_views(cameras: Sequence[Mapping], per_view: int = 2, max_angle_deg: float = 90.0) -> list[tuple[int, int]]:
    """Pairs of views with the largest viewing overlap: greedily, in increasing angle between the
    directions they see the subject from (`viewing_directions`; ties: nearer camera centres first),
    each view in at most `per_view` pairs. Views more than `max_angle_deg` apart see opposite
    sides and are never paired; nor is a view that does not face the subject, nor two views from
    one centre (a crop of the same camera: no baseline, so no triangulation). Unordered, sorted."""
    n = len(cameras)
    if n < 2:
        return []
    dirs, facing = viewing_directions(cameras)
    angle = np.degrees(np.arccos(np.clip(dirs @ dirs.T, -1.0, 1.0)))
    centres = np.stack([camera_centre(c) for c in cameras])
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    same_place = 1e-9 * (1.0 + np.abs(centres).max())
    # rounding makes the symmetric pairs of a regular rig exact ties, so distance decides them
    order = sorted((round(float(angle[i, j]), 6), float(dist[i, j]), i, j) for i in range(n) for j in range(i + 1, n)
                   if facing[i] and facing[j] and angle[i, j] <= max_angle_deg and dist[i, j] > same_place)
    degree, pairs = np.zeros(n, int), []
    for _, _, i, j in order:
        if degree[i] < per_view and degree[j] < per_view:
            pairs.append((i, j))
            degree[i] += 1
            degree[j] += 1
    return sorted(pairs)


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
                       min_matches: int = 16, per_view: int = 2) -> ReprojectionResult:
    """RE of `images` under `cameras` (same order) over the pairs of `pair_views`; `matcher`
    defaults to the wide-baseline matcher (SIFT, then ASIFT; RANSAC; a-contrario test).

    Pairs with fewer than `min_matches` surviving matches are skipped: with few matches RANSAC
    cannot tell outliers from inliers and one bad pair would dominate the mean."""
    if len(images) != len(cameras):
        raise ValueError(f"{len(images)} images but {len(cameras)} cameras")
    matcher = matcher or WideBaselineMatcher()
    images = [to_uint8(im) for im in images]
    size = max(max(im.shape[:2]) for im in images)
    per_pair, counts = {}, {}
    for i, j in pair_views(cameras, per_view):
        x_i, x_j = matcher(i, j, images[i], images[j])
        if len(x_i) < min_matches:
            continue
        err, n = pair_error(cameras[i], cameras[j], np.asarray(x_i, np.float64), np.asarray(x_j, np.float64))
        if n >= min_matches:
            per_pair[(i, j)], counts[(i, j)] = err, n
    if not per_pair:
        raise NotMeasurable(f"no pair of views had {min_matches} or more consistent matches "
                            "(views that share too little, or images too inconsistent to match)")
    re_px = float(np.mean(list(per_pair.values())))
    return ReprojectionResult(re_px, 100.0 * re_px / size, len(per_pair), per_pair, counts)


def reprojection_report(generated: Sequence, ground_truth: Sequence, cameras: Sequence[Mapping],
                        matcher: Matcher | None = None) -> dict:
    """RE of generated views next to the noise floor: the same measurement on ground truth."""
    gen = reprojection_error(generated, cameras, matcher)
    floor = reprojection_error(ground_truth, cameras, matcher)
    return {**gen.as_dict(), "noise_floor_pct": floor.re_pct, "noise_floor_px": floor.re_px}


class SiftMatcher:
    """OpenCV SIFT on grey, Lowe's ratio test, then RANSAC on the fundamental matrix (epipolar
    constraint x_j^T F x_i = 0 estimated from the matches alone). Runs offline, no weights. The
    plain matcher of the first version (no significance test): enough on dense rigs, where it is
    cheapest; `WideBaselineMatcher` is the default."""

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


FEATURE_CACHE_IMAGES = 48   # ~1.5 MB of ASIFT features per 256 px image (4 channels, uint8)
_FEATURES: OrderedDict = OrderedDict()


def _fundamental_inliers(x_i: np.ndarray, x_j: np.ndarray, px: float) -> np.ndarray:
    """Inlier mask of a robust fit of F (x_j^T F x_i = 0) with a `px` pixel threshold: MAGSAC++
    (deterministic: OpenCV's USAC seeds its own generator), else classic RANSAC. Degenerate
    matches (repeated or collinear points) have no F: no inliers."""
    import cv2

    for method in (getattr(cv2, "USAC_MAGSAC", None), cv2.FM_RANSAC):
        if method is None:
            continue
        try:
            _, mask = cv2.findFundamentalMat(x_i, x_j, method, px, 0.999, 10000)
        except cv2.error:                  # USAC asserts on degenerate samples instead of failing
            continue
        return np.zeros(len(x_i), bool) if mask is None else mask.ravel().astype(bool)
    return np.zeros(len(x_i), bool)


def _channels(image: np.ndarray, colour: bool) -> list[np.ndarray]:
    """Grey, and R, G, B as grey images of their own: cells of one texture that differ in hue
    more than in luminance have corners only in a colour channel."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return [grey, *(np.ascontiguousarray(image[..., c]) for c in range(3))] if colour else [grey]


class FeatureMatcher:
    """Local features + ratio test (Lowe) + mutual nearest neighbours, per channel; RANSAC on F;
    then the a-contrario test (module docstring): the pair's matches are returned only if the
    inlier count is at least `significance` x the median count on `null_trials` permutations.

    detector: "sift", or "asift" (cv2.AffineFeature around SIFT, tilts up to `max_tilt`; SIFT
    when this OpenCV has no AffineFeature), at most `max_features` keypoints per channel.
    Features are a function of the image content and are kept in a small process-wide LRU
    (`FEATURE_CACHE_IMAGES`): a view in several pairs, or measured again under other cameras,
    is described once."""

    def __init__(self, detector: str = "sift", colour: bool = True, ratio: float = 0.8, ransac_px: float = 1.0,
                 significance: float = 3.0, null_trials: int = 3, max_tilt: int = 4, max_features: int = 5000):
        if detector not in ("sift", "asift"):
            raise ValueError(f"detector must be 'sift' or 'asift', got {detector!r}")
        self.detector, self.colour, self.ratio, self.ransac_px = detector, colour, ratio, ransac_px
        self.significance, self.null_trials, self.max_tilt = significance, null_trials, max_tilt
        self.max_features = max_features

    def _make_detector(self):
        import cv2

        sift = cv2.SIFT_create()
        if self.detector == "asift" and hasattr(cv2, "AffineFeature_create"):
            return cv2.AffineFeature_create(sift, maxTilt=self.max_tilt)
        return sift

    def features(self, image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per channel (points (N, 2) [x, y], descriptors (N, 128) uint8: OpenCV's SIFT values are
        integers in [0, 255], so the small type is exact)."""
        import hashlib

        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        key = (self.detector, self.colour, self.max_tilt, self.max_features, image.shape, digest)
        if key in _FEATURES:
            _FEATURES.move_to_end(key)
            return _FEATURES[key]
        det = self._make_detector()
        out = []
        for channel in _channels(image, self.colour):
            kp, desc = det.detectAndCompute(channel, None)
            if desc is None:
                out.append((np.zeros((0, 2)), np.zeros((0, 128), np.uint8)))
                continue
            # the strongest `max_features`: bounds the N_i x N_j distance matrix of a pair (noise
            # and large images give tens of thousands of ASIFT keypoints)
            strongest = np.argsort([-k.response for k in kp], kind="stable")[: self.max_features]
            pts = np.float64([kp[k].pt for k in strongest]).reshape(-1, 2)
            out.append((pts, desc[strongest].astype(np.uint8)))
        _FEATURES[key] = out
        while len(_FEATURES) > FEATURE_CACHE_IMAGES:
            _FEATURES.popitem(last=False)
        return out

    def _match_channel(self, a, b) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours by squared L2, |a|^2 + |b|^2 - 2 a.b as one BLAS product (OpenCV's
        brute-force matcher is ~10x slower on ASIFT's thousands of descriptors)."""
        (p_i, d_i), (p_j, d_j) = a, b
        if len(d_i) < 2 or len(d_j) < 2:
            return np.zeros((0, 2)), np.zeros((0, 2))
        import torch

        a, b = torch.from_numpy(d_i.astype(np.float32)), torch.from_numpy(d_j.astype(np.float32))
        dist = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T).clamp_min_(0.0)
        two, nn2 = dist.topk(2, dim=1, largest=False)           # sorted: nearest first
        nn = nn2[:, 0]
        # Lowe's ratio on distances (the squares: ratio^2), then mutual: i is j's nearest as well
        mutual = dist.argmin(dim=0)[nn] == torch.arange(len(a))
        keep = ((two[:, 0] < self.ratio ** 2 * two[:, 1]) & mutual).numpy()
        nn = nn.numpy()
        return p_i[keep], p_j[nn[keep]]

    def candidates(self, i, j, image_i, image_j) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test, mutual matches of all channels; a correspondence found in several channels
        counts once (same positions to 0.5 px)."""
        pairs = [self._match_channel(a, b) for a, b in zip(self.features(image_i), self.features(image_j))]
        x_i = np.concatenate([p[0] for p in pairs]).reshape(-1, 2)
        x_j = np.concatenate([p[1] for p in pairs]).reshape(-1, 2)
        _, first = np.unique(np.round(np.hstack([x_i, x_j]) * 2), axis=0, return_index=True)
        first = np.sort(first)
        return x_i[first], x_j[first]

    def significant(self, x_i: np.ndarray, x_j: np.ndarray, inliers: int, seed: int) -> bool:
        """a-contrario test: `inliers` against RANSAC's count on matches permuted at random, which
        keeps each view's keypoint layout (a small figure concentrates them: chance fits are more
        likely than for points spread over the image) but breaks every correspondence."""
        rng = np.random.default_rng(seed)
        null = [int(_fundamental_inliers(x_i, x_j[rng.permutation(len(x_j))], self.ransac_px).sum())
                for _ in range(self.null_trials)]
        return inliers >= self.significance * max(float(np.median(null)), 1.0)

    def __call__(self, i, j, image_i, image_j):
        empty = np.zeros((0, 2))
        x_i, x_j = self.candidates(i, j, image_i, image_j)
        if len(x_i) < 8:                       # the 8-point minimum of F
            return empty, empty
        keep = _fundamental_inliers(x_i, x_j, self.ransac_px)
        if keep.sum() < 8 or not self.significant(x_i, x_j, int(keep.sum()), seed=1_000_003 * i + j):
            return empty, empty
        return x_i[keep], x_j[keep]


class WideBaselineMatcher:
    """The default matcher: SIFT first (cheap, enough for a dense rig); for a pair it cannot
    match (too few or not significant inliers), ASIFT, which simulates the affine distortion
    that a large change of viewpoint applies to a surface patch (Yu & Morel 2011)."""

    def __init__(self, min_inliers: int = 24, **kw):
        self.min_inliers = min_inliers
        self.tiers = [FeatureMatcher("sift", **kw), FeatureMatcher("asift", **kw)]

    def __call__(self, i, j, image_i, image_j):
        best = (np.zeros((0, 2)), np.zeros((0, 2)))
        for tier in self.tiers:
            found = tier(i, j, image_i, image_j)
            if len(found[0]) > len(best[0]):
                best = found
            if len(best[0]) >= self.min_inliers:
                break
        return best


class UpscaledMatcher:
    """Another matcher on views upscaled `factor` times (bicubic), matches mapped back to the
    original pixel centres (x + 0.5) / f - 0.5. On small views (under ~128 px) SIFT finds too few
    keypoints for the significance test, so even ground-truth pairs go unmeasured; upscaling
    doubles the measurable pairs at 64-96 px and moves the noise floor little (benches/RESULTS.md)."""

    def __init__(self, matcher: Matcher, factor: int = 2):
        self.matcher, self.factor = matcher, factor

    def __call__(self, i, j, image_i, image_j):
        import cv2

        f = self.factor
        up = [cv2.resize(np.ascontiguousarray(im), None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
              for im in (image_i, image_j)]
        x_i, x_j = self.matcher(i, j, *up)
        return (np.asarray(x_i) + 0.5) / f - 0.5, (np.asarray(x_j) + 0.5) / f - 0.5


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
