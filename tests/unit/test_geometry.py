"""Camera geometry (SPEC §4): Plücker maps, projection, intrinsics under resize/crop, distortion."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dataprep.studio import geometry as g
from dataprep.errors import CalibrationError


def random_camera(rng, height, width):
    f = rng.uniform(0.6, 2.0) * max(height, width)
    K = np.array([[f * rng.uniform(0.95, 1.05), rng.uniform(-2, 2), width / 2 + rng.uniform(-10, 10)],
                  [0.0, f, height / 2 + rng.uniform(-10, 10)],
                  [0.0, 0.0, 1.0]])
    R = Rotation.random(random_state=rng.integers(1 << 31)).as_matrix()
    t = rng.normal(0, 2, 3)
    return K, R, t


def exact_rays(K, R, t, height, width):
    """Reference rays by the textbook formula, one pixel at a time in float64."""
    Kinv = np.linalg.inv(K)
    o = -R.T @ t
    d = np.empty((height, width, 3))
    for i in range(height):
        for j in range(width):
            v = R.T @ Kinv @ np.array([j, i, 1.0])
            d[i, j] = v / np.linalg.norm(v)
    return o, d


@pytest.mark.parametrize("seed", range(5))
def test_plucker_is_unit_orthogonal_and_projects_back(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    K, R, t = random_camera(rng, h, w)
    P = g.plucker(K, R, t, h, w)
    assert P.shape == (6, h, w) and P.dtype == np.float32
    d, m = P[:3].astype(np.float64), P[3:].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-6)
    assert np.abs((d * m).sum(axis=0)).max() < 1e-5                     # m ⊥ d
    o = g.camera_center(R, t)
    np.testing.assert_allclose(m, np.cross(o, d, axis=0), atol=1e-5)     # m = o × d
    o_ref, d_ref = exact_rays(K, R, t, h, w)
    np.testing.assert_allclose(d.transpose(1, 2, 0), d_ref, atol=1e-6)
    # A point on the ray of pixel (i, j) projects back onto (j, i).
    depth = rng.uniform(0.5, 5.0, (h, w))
    X = o[None, None] + depth[..., None] * d_ref
    uv, z = g.project_with_depth(K, R, t, X.reshape(-1, 3))
    assert np.all(z > 0)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    assert np.abs(uv[:, 0] - jj.ravel()).max() < 1e-4
    assert np.abs(uv[:, 1] - ii.ravel()).max() < 1e-4
    # and the float32 rays as stored still hit the pixel within 1e-4 px at these focal lengths
    X32 = o[None, None] + depth[..., None] * d.transpose(1, 2, 0)
    uv32 = g.project(K, R, t, X32.reshape(-1, 3))
    assert np.abs(uv32[:, 0] - jj.ravel()).max() < 2e-4


@pytest.mark.parametrize("f", [2, 4, 8])
def test_coarse_plucker_equals_exact_rays_at_coarse_pixel_centres(f):
    rng = np.random.default_rng(f)
    h, w = 16 * f, 12 * f
    K, R, t = random_camera(rng, h, w)
    coarse = g.plucker(g.resize_intrinsics(K, 1 / f), R, t, h // f, w // f)
    # Coarse pixel (a, b) covers fine pixels [f·a, f·a + f); its centre is at f·a + (f − 1)/2.
    centres_j = f * np.arange(w // f) + (f - 1) / 2
    centres_i = f * np.arange(h // f) + (f - 1) / 2
    Kinv = np.linalg.inv(K)
    jj, ii = np.meshgrid(centres_j, centres_i)
    pix = np.stack([jj, ii, np.ones_like(jj)], axis=-1)
    d = pix @ (R.T @ Kinv).T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    np.testing.assert_allclose(coarse[:3].transpose(1, 2, 0), d, atol=1e-6)
    # and it is NOT the naive subsample of the fine map (that would be off by half a coarse pixel)
    fine = g.plucker(K, R, t, h, w)
    assert np.abs(fine[:3, ::f, ::f] - coarse[:3]).max() > 1e-4


def test_resize_and_crop_keep_rays_of_the_same_image_points():
    rng = np.random.default_rng(7)
    K, R, t = random_camera(rng, 64, 48)
    # A crop then a 2x downscale: coarse pixel (a, b) centre sits at fine (x0 + 2b + 0.5, y0 + 2a + 0.5).
    x0, y0 = 5, 9
    K2 = g.resize_intrinsics(g.crop_intrinsics(K, x0, y0), 0.5)
    P = g.plucker(K2, R, t, 10, 8)
    a, b = 3, 4
    ray = R.T @ np.linalg.inv(K) @ np.array([x0 + 2 * b + 0.5, y0 + 2 * a + 0.5, 1.0])
    np.testing.assert_allclose(P[:3, a, b], ray / np.linalg.norm(ray), atol=1e-6)


def test_undistortion_inverts_distortion():
    rng = np.random.default_rng(3)
    K = np.array([[800.0, 0, 320], [0, 805, 240], [0, 0, 1]])
    for dist in ([0.12, -0.05, 0.001, -0.002], [-0.2, 0.04, -0.003, 0.002], [0.0, 0.0, 0.0, 0.0]):
        uv = rng.uniform([0, 0], [640, 480], (2000, 2))
        back = g.undistort_points(g.distort_points(uv, K, dist), K, dist)
        assert np.abs(back - uv).max() < 1e-6
        again = g.distort_points(g.undistort_points(uv, K, dist), K, dist)
        assert np.abs(again - uv).max() < 1e-6
    # distortion actually moves points (the test above would pass for an identity)
    assert np.abs(g.distort_points(uv, K, [0.12, -0.05, 0.001, -0.002]) - uv).max() > 1.0


def test_undistort_image_moves_a_dot_to_its_ideal_position():
    K = np.array([[100.0, 0, 80], [0, 100, 60], [0, 0, 1]])
    dist = [0.3, 0.1, 0.0, 0.0]
    ideal = np.array([[140.0, 100.0]])
    seen = g.distort_points(ideal, K, dist)[0]
    img = np.zeros((120, 160), np.float32)
    yy, xx = np.mgrid[0:120, 0:160]
    img[:] = np.exp(-((xx - seen[0]) ** 2 + (yy - seen[1]) ** 2) / 2.0)
    out = g.undistort_image(img, K, dist)
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert abs(peak[1] - 140) <= 1 and abs(peak[0] - 100) <= 1
    assert np.abs(seen - ideal[0]).max() > 5   # the dot really moved


def test_project_matches_explicit_formula():
    rng = np.random.default_rng(11)
    K, R, t = random_camera(rng, 100, 80)
    X = rng.normal(0, 1, (50, 3)) + g.camera_center(R, t) + 5 * R[2]
    uv = g.project(K, R, t, X)
    assert uv.shape == (50, 2) and uv.dtype == np.float32
    for k in range(50):
        p = K @ (R @ X[k] + t)
        np.testing.assert_allclose(uv[k], p[:2] / p[2], rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("mutate, message", [
    (lambda K, R, t: (K, R * np.array([1.0, 1.02, 1.0]), t), "not orthonormal"),
    (lambda K, R, t: (K, R @ np.diag([1.0, 1.0, -1.0]), t), "det"),
    (lambda K, R, t: (K * np.array([[-1.0], [1.0], [1.0]]), R, t), "focal"),
    (lambda K, R, t: (K, R, t * np.array([1.0, np.nan, 1.0])), "non-finite"),
])
def test_validation_rejects_bad_cameras(mutate, message):
    rng = np.random.default_rng(0)
    K, R, t = random_camera(rng, 32, 32)
    g.validate_camera(K, R, t, "capX: camera 1")      # the unmutated camera is valid
    with pytest.raises(CalibrationError, match=message) as info:
        g.validate_camera(*mutate(K.copy(), R.copy(), t.copy()), "capX: camera 1")
    assert "capX: camera 1" in str(info.value)


def test_look_at_points_the_optical_axis_at_the_target():
    eye, target = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0])
    R, t = g.look_at(eye, target)
    g.validate_camera(np.eye(3), R, t)
    np.testing.assert_allclose(g.camera_center(R, t), eye, atol=1e-12)
    K = np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]])
    np.testing.assert_allclose(g.project(K, R, t, target[None])[0], [50, 40], atol=1e-4)
