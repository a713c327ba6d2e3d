"""Camera geometry in the convention of SPEC §4 (vectorised numpy).

World-to-camera OpenCV: x_cam = R·X + t, metres; integer pixel coordinates are pixel centres.
Pixel (row i, column j) looks along d(i, j) = normalize(Rᵀ K⁻¹ [j, i, 1]ᵀ) from o = −Rᵀt.
The Plücker coordinates of that ray are [d, o × d] (Plücker 1865; as used by Pippo §3.3 and
LFN/CAT3D for per-pixel camera conditioning).

Public functions take float64 and return float32 where SPEC says so; helpers return float64.
"""
from __future__ import annotations

import numpy as np

from dataprep.errors import CalibrationError

ROTATION_TOL = 1e-6  # |RᵀR − I| and |det R − 1|; calibrations store ~9 significant digits
# Plausibility bounds of a calibration, far beyond any real camera (a 100 MP sensor behind a long
# lens has f ~ 1e5 px): values outside them are corrupt and would overflow in the maths.
MIN_FOCAL_PX, MAX_PIXELS_COORD = 1e-3, 1e7
MAX_TRANSLATION_M = 1e6
MAX_DISTORTION = 1e4


def validate_camera(K, R, t, where: str = "camera", dist=None) -> None:
    """Raise CalibrationError (naming `where`) unless K, R, t describe a valid pinhole camera."""
    K, R, t = np.asarray(K, np.float64), np.asarray(R, np.float64), np.asarray(t, np.float64)
    if K.shape != (3, 3) or R.shape != (3, 3) or t.shape != (3,):
        raise CalibrationError(f"{where}: shapes K{K.shape} R{R.shape} t{t.shape}, expected (3,3) (3,3) (3,)")
    arrays = {"K": K, "R": R, "t": t}
    if dist is not None:
        arrays["distortion"] = np.asarray(dist, np.float64)
    for name, a in arrays.items():
        if not np.all(np.isfinite(a)):
            raise CalibrationError(f"{where}: {name} has non-finite values")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CalibrationError(f"{where}: focal lengths must be positive (fx={K[0, 0]:g}, fy={K[1, 1]:g})")
    if abs(K[1, 0]) + abs(K[2, 0]) + abs(K[2, 1]) > 0 or K[2, 2] != 1:
        raise CalibrationError(f"{where}: K is not upper-triangular with K[2,2]=1")
    # Finite is not enough: fx = 1.7e308 is finite, but resizing, projecting or inverting it
    # overflows to inf/nan far from here. Bounds well beyond any real camera keep the math finite.
    for name, value, low, high in (("fx", K[0, 0], MIN_FOCAL_PX, MAX_PIXELS_COORD),
                                   ("fy", K[1, 1], MIN_FOCAL_PX, MAX_PIXELS_COORD)):
        if not low <= value <= high:
            raise CalibrationError(f"{where}: {name}={value:g} is outside [{low:g}, {high:g}] pixels")
    if max(abs(K[0, 1]), abs(K[0, 2]), abs(K[1, 2])) > MAX_PIXELS_COORD:
        raise CalibrationError(f"{where}: principal point or skew beyond {MAX_PIXELS_COORD:g} pixels")
    if np.abs(t).max() > MAX_TRANSLATION_M:
        raise CalibrationError(f"{where}: translation beyond {MAX_TRANSLATION_M:g} m")
    if dist is not None and np.abs(arrays["distortion"]).max(initial=0.0) > MAX_DISTORTION:
        raise CalibrationError(f"{where}: distortion coefficients beyond ±{MAX_DISTORTION:g}")
    validate_rotation(R, where)


def validate_rotation(R, where: str = "rotation") -> None:
    """Raise CalibrationError unless R is orthonormal with det +1 (within ROTATION_TOL)."""
    R = np.asarray(R, np.float64)
    if R.shape != (3, 3) or not np.all(np.isfinite(R)):
        raise CalibrationError(f"{where}: R must be a finite 3×3 matrix")
    ortho = np.abs(R.T @ R - np.eye(3)).max()
    if ortho > ROTATION_TOL:
        raise CalibrationError(f"{where}: R is not orthonormal (max |RᵀR − I| = {ortho:.2e})")
    det = np.linalg.det(R)
    if abs(det - 1.0) > ROTATION_TOL:
        raise CalibrationError(f"{where}: R has det {det:+.6f}, expected +1 (a reflection, not a rotation)")


def camera_center(R, t) -> np.ndarray:
    """o = −Rᵀt (float64)."""
    return -np.asarray(R, np.float64).T @ np.asarray(t, np.float64)


def resize_intrinsics(K, sx: float, sy: float | None = None) -> np.ndarray:
    """K of an image resized by (sx, sy): f ← s·f, c ← s·(c + 0.5) − 0.5 (half-pixel rule, SPEC §4).

    Pixel centres sit at integer coordinates, so the image edge is at −0.5; scaling the edge-
    anchored coordinate c + 0.5 keeps the field of view exactly the same.
    """
    sy = sx if sy is None else sy
    K = np.array(K, np.float64)
    K[0, :] *= sx
    K[1, :] *= sy
    K[0, 2] += 0.5 * sx - 0.5
    K[1, 2] += 0.5 * sy - 0.5
    return K


def crop_intrinsics(K, x0: float, y0: float) -> np.ndarray:
    """K of the crop whose top-left pixel was (x0, y0): c ← c − (x0, y0)."""
    K = np.array(K, np.float64)
    K[0, 2] -= x0
    K[1, 2] -= y0
    return K


def _ray_basis(K, R, t):
    """M = Rᵀ K⁻¹ (world direction of pixel [j, i, 1]) and the centre o, both float64."""
    K = np.asarray(K, np.float64)
    R = np.asarray(R, np.float64)
    return R.T @ np.linalg.inv(K), camera_center(R, t)


def ray_directions(K, R, t, height: int, width: int) -> np.ndarray:
    """Unit world directions of every pixel centre, (height, width, 3) float64."""
    M, _ = _ray_basis(K, R, t)
    j = np.arange(width, dtype=np.float64)
    i = np.arange(height, dtype=np.float64)
    d = (M[:, 0] * j[:, None])[None, :, :] + (M[:, 1] * i[:, None])[:, None, :] + M[:, 2]
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def plucker(K, R, t, height: int, width: int) -> np.ndarray:
    """Plücker map [d, o × d] of every pixel centre: (6, height, width) float32 (SPEC §4).

    d = Rᵀ K⁻¹ [j, i, 1]ᵀ is affine in (j, i): d = M₀ j + M₁ i + M₂, so it is built from two
    outer sums instead of a 3×3 matmul per pixel, and o × d = [o]ₓ d is the same affine map with
    the columns of [o]ₓ M. Only the normalisation is per pixel. All per-pixel work is float32
    (the storage type); the 3×3 algebra stays float64, so the only error is float32 rounding.
    """
    M, o = _ray_basis(K, R, t)
    ox = np.array([[0.0, -o[2], o[1]], [o[2], 0.0, -o[0]], [-o[1], o[0], 0.0]])
    A = np.concatenate([M, ox @ M], axis=0).astype(np.float32)      # (6, 3): rows map [j, i, 1]
    j = np.arange(width, dtype=np.float32)
    i = np.arange(height, dtype=np.float32)
    out = np.empty((6, height, width), np.float32)
    # out[c, i, j] = A[c,0]·j + A[c,1]·i + A[c,2]
    np.add((A[:, 1:2] * i[None, :] + A[:, 2:3])[:, :, None], (A[:, 0:1] * j[None, :])[:, None, :], out=out)
    norm = np.sqrt(np.einsum("chw,chw->hw", out[:3], out[:3]))
    np.divide(out, norm[None], out=out)
    return out


def project_with_depth(K, R, t, X) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection of world points X (N, 3): pixel coords (N, 2) and camera depth z (N,), float64."""
    X = np.asarray(X, np.float64).reshape(-1, 3)
    xc = X @ np.asarray(R, np.float64).T + np.asarray(t, np.float64)
    z = xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uvw = xc @ np.asarray(K, np.float64).T
        uv = uvw[:, :2] / uvw[:, 2:3]
    return uv, z


def project(K, R, t, X) -> np.ndarray:
    """Pixel coordinates (u = column, v = row) of world points X (N, 3) -> (N, 2) float32 (SPEC §4)."""
    return project_with_depth(K, R, t, X)[0].astype(np.float32)


# ---- radial-tangential (Brown-Conrady, OpenCV's k1 k2 p1 p2) lens distortion ---------------------

def distort_normalized(xy, dist) -> np.ndarray:
    """Apply k1, k2, p1, p2 to normalised image coordinates (N, 2) (OpenCV's model)."""
    k1, k2, p1, p2 = (list(np.asarray(dist, np.float64).ravel()) + [0.0] * 4)[:4]
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([xd, yd], axis=-1)


def undistort_normalized(xy_d, dist, iterations: int = 20) -> np.ndarray:
    """Invert `distort_normalized` by Newton's method on the 2×2 Jacobian (float64).

    OpenCV's cv2.undistortPoints uses a fixed-point iteration that stalls around 1e-3 px on strong
    distortion; Newton converges quadratically, to float64 precision, in a few steps.
    """
    k1, k2, p1, p2 = (list(np.asarray(dist, np.float64).ravel()) + [0.0] * 4)[:4]
    xy_d = np.asarray(xy_d, np.float64)
    xy = xy_d.copy()
    for _ in range(iterations):
        x, y = xy[:, 0], xy[:, 1]
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dradial = 2 * k1 + 4 * k2 * r2                     # d(radial)/d(r2) · 2
        res = distort_normalized(xy, dist) - xy_d
        j00 = radial + x * dradial * x + 2 * p1 * y + 6 * p2 * x
        j01 = x * dradial * y + 2 * p1 * x + 2 * p2 * y
        j10 = y * dradial * x + 2 * p1 * x + 2 * p2 * y
        j11 = radial + y * dradial * y + 6 * p1 * y + 2 * p2 * x
        det = j00 * j11 - j01 * j10
        step_x = (j11 * res[:, 0] - j01 * res[:, 1]) / det
        step_y = (-j10 * res[:, 0] + j00 * res[:, 1]) / det
        xy = xy - np.stack([step_x, step_y], axis=-1)
        if np.abs(res).max(initial=0.0) < 1e-15:
            break
    return xy


def distort_points(uv, K, dist) -> np.ndarray:
    """Ideal (pinhole) pixel coords (N, 2) -> pixel coords seen through the lens."""
    K = np.asarray(K, np.float64)
    xy = (np.asarray(uv, np.float64) - K[:2, 2]) @ np.linalg.inv(K[:2, :2]).T
    return distort_normalized(xy, dist) @ K[:2, :2].T + K[:2, 2]


def undistort_points(uv, K, dist) -> np.ndarray:
    """Pixel coords seen through the lens (N, 2) -> ideal (pinhole) pixel coords with the same K."""
    K = np.asarray(K, np.float64)
    xy_d = (np.asarray(uv, np.float64) - K[:2, 2]) @ np.linalg.inv(K[:2, :2]).T
    return undistort_normalized(xy_d, dist) @ K[:2, :2].T + K[:2, 2]


def undistort_image(image: np.ndarray, K, dist, interpolation: str = "linear") -> np.ndarray:
    """Resample a distorted image to the ideal pinhole camera with the same K (cv2.remap).

    For every output (ideal) pixel we compute where the lens put it (`distort_points`) and sample
    there, which is exactly what cv2.initUndistortRectifyMap does; we build the map ourselves so
    it uses the same float64 model as the rest of this module.
    """
    import cv2

    if not np.any(np.asarray(dist, np.float64)):
        return image
    h, w = image.shape[:2]
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    src = distort_points(np.stack([jj.ravel(), ii.ravel()], axis=-1), K, dist)
    map_x = src[:, 0].reshape(h, w).astype(np.float32)
    map_y = src[:, 1].reshape(h, w).astype(np.float32)
    flag = cv2.INTER_NEAREST if interpolation == "nearest" else cv2.INTER_LINEAR
    return cv2.remap(image, map_x, map_y, flag, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of an OpenCV camera at `eye` looking at `target` (y down in image)."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:             # looking straight along `up`
        x = np.cross(z, np.array([1.0, 0.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ eye
