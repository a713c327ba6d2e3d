"""Plücker maps for 80 views at 1024²: megapixels/s of dataprep.studio.geometry.plucker against a
straightforward per-view numpy implementation, measured in the same run (ratio = speed-up)."""
import time

import numpy as np
from scipy.spatial.transform import Rotation

from dataprep.studio.geometry import plucker

VIEWS, SIZE, REPEATS = 80, 1024, 3


def straightforward(K, R, t, h, w):
    """The textbook version: homogeneous pixel grid, K⁻¹ then Rᵀ as matmuls, np.cross, float64."""
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pix = np.stack([jj, ii, np.ones_like(jj)], axis=-1).reshape(-1, 3)
    d = (R.T @ np.linalg.inv(K) @ pix.T).T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    o = -R.T @ t
    m = np.cross(np.broadcast_to(o, d.shape), d)
    return np.concatenate([d, m], axis=1).T.reshape(6, h, w).astype(np.float32)


def cameras(n, rng):
    for _ in range(n):
        f = rng.uniform(800, 1500)
        K = np.array([[f, 0, SIZE / 2], [0, f, SIZE / 2], [0, 0, 1.0]])
        yield K, Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(0, 2, 3)


def best_of(fn, cams):
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for K, R, t in cams:
            fn(K, R, t, SIZE, SIZE)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    cams = list(cameras(VIEWS, np.random.default_rng(0)))
    K, R, t = cams[0]
    err = np.abs(plucker(K, R, t, SIZE, SIZE) - straightforward(K, R, t, SIZE, SIZE)).max()
    base = best_of(straightforward, cams)
    ours = best_of(plucker, cams)
    mpix = VIEWS * SIZE * SIZE / 1e6
    print(f"plucker {VIEWS} views at {SIZE}²: ours {mpix / ours:.1f} MP/s, straightforward "
          f"{mpix / base:.1f} MP/s, ratio {base / ours:.2f}x (max abs diff {err:.1e})")


if __name__ == "__main__":
    main()
