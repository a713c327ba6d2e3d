"""Metrics: reprojection error (pairing, DLT, matchers, `pippo eval reprojection`), PSNR, SSIM, FID."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pippo_model.metrics.fid import fid, frechet_distance, gaussian_stats
from pippo_model.metrics.image import psnr, ssim
from pippo_model.metrics.reprojection import (ExactMatcher, FeatureMatcher, SiftMatcher, WideBaselineMatcher,
                                              _fundamental_inliers, camera_centre, pair_views, project,
                                              reprojection_error, reprojection_report, triangulate)
from pipelines.cli import main

torch.set_num_threads(1)


def look_at(eye, target=(0.0, 0.0, 0.0)):
    """World-to-camera R, t for a camera at `eye` looking at `target` (OpenCV: +z forward, +y down)."""
    eye = np.asarray(eye, float)
    z = np.asarray(target, float) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ eye


def ring_cameras(n, radius=2.0, f=300.0, size=(240, 320)):
    cams = []
    for k in range(n):
        a = 2 * math.pi * k / n
        R, t = look_at([radius * math.cos(a), radius * math.sin(a), 0.3])
        cams.append({"K": np.array([[f, 0, size[1] / 2 - 0.5], [0, f, size[0] / 2 - 0.5], [0, 0, 1]]), "R": R, "t": t})
    return cams


def perturbed(cams, scale, seed=0):
    """The same random camera error (rotation about a random axis, centre shift), scaled."""
    rng = np.random.default_rng(seed)
    out = []
    for cam in cams:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = math.radians(0.1) * scale
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        dR = np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K  # Rodrigues
        shift = rng.normal(size=3) * 0.002 * scale
        R = dR @ cam["R"]
        centre = camera_centre(cam) + shift
        out.append({**cam, "R": R, "t": -R @ centre})
    return out


def test_pairs_by_viewing_direction():
    ring = ring_cameras(8)
    pairs = pair_views(ring)
    assert pairs == sorted({(min(i, j), max(i, j)) for i, j in pairs})          # unordered, sorted
    assert pairs == sorted((min(k, (k + 1) % 8), max(k, (k + 1) % 8)) for k in range(8))  # ring neighbours
    assert np.bincount(np.ravel(pairs)).tolist() == [2] * 8                      # each view in 2 pairs
    assert len(pair_views(ring, per_view=1)) == 4
    assert all(abs(i - j) in (1, 7) for i, j in pair_views(ring, per_view=1))
    # beside camera 0 but facing away (axis reversed): it sees the other side, so a pairing by
    # camera centres would pick it first; by viewing direction it has no partner
    R = np.diag([-1.0, 1.0, -1.0]) @ ring[0]["R"]
    away = {"K": ring[0]["K"], "R": R, "t": -R @ (camera_centre(ring[0]) + [0.01, 0.0, 0.0])}
    assert all(8 not in p for p in pair_views([*ring, away]))
    # a crop of view 3 (same camera, other K) sits at the same centre: no baseline, never a pair
    crop = {**ring[3], "K": ring[3]["K"] * np.array([[2.0], [2.0], [1.0]])}
    assert (3, 8) not in pair_views([*ring, crop])
    # parallel cameras (equal angles): the nearer centre is the partner
    cams = [{"K": np.eye(3), "R": np.eye(3), "t": -np.array(c, float)} for c in ([0, 0, 0], [5, 0, 0], [0.1, 0, 0])]
    assert pair_views(cams, per_view=1) == [(0, 2)]


def test_dlt_recovers_points_and_re_grows_with_pixel_noise():
    rng = np.random.default_rng(0)
    X = rng.uniform(-0.5, 0.5, size=(200, 3))
    cams = ring_cameras(8)
    x0, _ = project(cams[0], X)
    x1, _ = project(cams[1], X)
    np.testing.assert_allclose(triangulate(cams[0], cams[1], x0, x1), X, atol=1e-9)
    images = [np.zeros((240, 320, 3), np.uint8)] * 8

    def noisy(sigma):
        def match(i, j, a, b):
            g = np.random.default_rng(100 * i + j)
            xi, xj = project(cams[i], X)[0], project(cams[j], X)[0]
            return xi + g.normal(0, sigma, xi.shape), xj + g.normal(0, sigma, xj.shape)
        return match

    exact = reprojection_error(images, cams, noisy(0.0))
    assert exact.pairs == 8 and exact.re_px < 1e-8
    res = [reprojection_error(images, cams, noisy(s)) for s in (0.5, 1.0, 2.0)]
    assert res[0].re_px < res[1].re_px < res[2].re_px
    # DLT absorbs the error component along the epipolar direction: RE is a fraction of sigma
    assert 0.2 < res[1].re_px < 1.5
    assert res[1].re_pct == pytest.approx(100 * res[1].re_px / 320)


@pytest.fixture(scope="module")
def synth_views():
    synth = pytest.importorskip("dataprep.studio.synth")
    return synth.render_views(24, 384, 256, seed=0)


def cams_of(views):
    return [{k: v[k] for k in ("K", "R", "t")} for v in views]


def test_re_on_ground_truth_is_low_and_rises_with_camera_noise(synth_views):
    images = [v["image"] for v in synth_views]
    cams = cams_of(synth_views)
    sift = reprojection_error(images, cams, SiftMatcher())
    assert sift.pairs >= 4
    assert sift.re_pct < 0.5  # the metric's noise floor on ground truth
    exact = ExactMatcher([v["points"] for v in synth_views], cams)
    assert reprojection_error(images, cams, exact).re_pct < 1e-6
    for matcher in (SiftMatcher(), exact):
        levels = [reprojection_error(images, perturbed(cams, s), matcher).re_pct for s in (0, 1, 2, 4, 8)]
        assert all(a < b for a, b in zip(levels, levels[1:])), levels


def test_report_gives_the_noise_floor(synth_views):
    images = [v["image"] for v in synth_views]
    cams = cams_of(synth_views)
    exact = ExactMatcher([v["points"] for v in synth_views], cams)
    report = reprojection_report(images, images, perturbed(cams, 4), exact)
    assert report["noise_floor_pct"] == report["re_pct"] > 0
    # torch tensors in [-1, 1] are accepted as well
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
    assert reprojection_error(tensors, cams, SiftMatcher()).re_px == pytest.approx(
        reprojection_error(images, cams, SiftMatcher()).re_px)


def write_views(directory, views, cams=None):
    directory.mkdir(parents=True, exist_ok=True)
    cams = cams or cams_of(views)
    doc = {"views": [{"K": c["K"].tolist(), "R": c["R"].tolist(), "t": c["t"].tolist(),
                      "height": v["height"], "width": v["width"]} for v, c in zip(views, cams)]}
    (directory / "cameras.json").write_text(json.dumps(doc))
    for i, v in enumerate(views):
        Image.fromarray(v["image"]).save(directory / f"view{i:02d}.png")


def test_eval_reprojection_command(synth_views, tmp_path, capsys):
    write_views(tmp_path / "gt", synth_views)
    assert main(["eval", "reprojection", str(tmp_path / "gt"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"re_pct", "re_px", "pairs"}
    assert isinstance(doc["pairs"], int) and doc["pairs"] >= 4 and doc["re_pct"] < 0.5
    write_views(tmp_path / "bad_cams", synth_views, perturbed(cams_of(synth_views), 8))
    assert main(["eval", "reprojection", str(tmp_path / "bad_cams"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["re_pct"] > doc["re_pct"]
    assert main(["eval", "reprojection", str(tmp_path / "gt")]) == 0
    assert "% of max(H, W)" in capsys.readouterr().out
    (tmp_path / "gt" / "view03.png").unlink()
    assert main(["eval", "reprojection", str(tmp_path / "gt"), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "view03.png" in out.err and len(out.err.strip().splitlines()) == 1
    assert main(["eval", "reprojection", str(tmp_path / "nowhere")]) == 2


@pytest.fixture(scope="module")
def sparse_rig(tmp_path_factory):
    """8 cameras evenly around the figure (45 degrees apart), 256 x 256: the eval layout on disk."""
    synth = pytest.importorskip("dataprep.studio.synth")
    return synth.write_views(tmp_path_factory.mktemp("ring8"), 8, 256, 256)


def read_rig(directory):
    doc = json.loads((directory / "cameras.json").read_text())
    images = [np.asarray(Image.open(directory / f"view{i:02d}.png").convert("RGB")) for i in range(len(doc["views"]))]
    return images, [{k: np.array(v[k]) for k in ("K", "R", "t")} for v in doc["views"]]


def test_sparse_rig_measures_pairs_at_the_noise_floor(sparse_rig, capsys):
    """Camera-centre pairing + SIFT found no pair here; viewing-direction pairs + ASIFT + the
    a-contrario test measure the pairs that share surface and drop those with chance matches."""
    assert main(["eval", "reprojection", str(sparse_rig), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"re_pct", "re_px", "pairs"}
    assert doc["pairs"] >= 4 and doc["re_pct"] < 0.5, doc
    images, cams = read_rig(sparse_rig)
    matcher = WideBaselineMatcher()                  # one instance: features are computed once
    base = reprojection_error(images, cams, matcher)
    assert base.re_pct == pytest.approx(doc["re_pct"]) and max(base.per_pair.values()) < 0.005 * 256
    worse = reprojection_error(images, perturbed(cams, 8), matcher)
    assert worse.re_pct > 2 * base.re_pct                  # still sensitive to the cameras


def test_pairs_with_only_chance_matches_are_not_measured(sparse_rig):
    """The a-contrario test: neighbours on the rig give hundreds of matches, many times what RANSAC
    fits once their correspondence is broken by a permutation; broken matches and noise images
    give a pair no matches at all."""
    images, _ = read_rig(sparse_rig)
    matcher = FeatureMatcher("asift")
    x_i, x_j = matcher(0, 1, images[0], images[1])
    assert len(x_i) >= 100 and len(x_j) == len(x_i)
    cand_i, cand_j = matcher.candidates(0, 1, images[0], images[1])
    shuffled = cand_j[np.random.default_rng(1).permutation(len(cand_j))]
    inliers = int(_fundamental_inliers(cand_i, shuffled, 1.0).sum())
    assert inliers >= 8 and not matcher.significant(cand_i, shuffled, inliers, seed=0)   # RANSAC fits chance
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2)]
    for m in (FeatureMatcher("sift"), WideBaselineMatcher()):
        assert len(m(0, 1, *noise)[0]) == 0


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((2,), 10 * math.log10(4 / 0.01)))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    noisy = [ssim(x, x + s * torch.randn(x.shape, generator=g)) for s in (0.05, 0.2, 0.8)]
    assert (noisy[0] > noisy[1]).all() and (noisy[1] > noisy[2]).all()
    # against a direct evaluation of Wang et al.'s formula, window by window
    a, b = x[:1, :1, :13, :13].double(), (x[:1, :1, :13, :13] * 0.5 + 0.1).double()
    coords = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    w = (w[:, None] * w[None]) / (w.sum() ** 2)
    c1, c2, vals = (0.01 * 2) ** 2, (0.03 * 2) ** 2, []
    for i in range(3):
        for j in range(3):
            pa, pb = a[0, 0, i:i + 11, j:j + 11], b[0, 0, i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert ssim(a.float(), b.float()).item() == pytest.approx(torch.stack(vals).mean().item(), abs=1e-5)


def test_frechet_distance_on_known_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = np.diag(rng.uniform(0.5, 2, d)), np.diag(rng.uniform(0.5, 2, d))
    # diagonal covariances: sum of per-dimension 1-D distances (sqrt(s1) - sqrt(s2))^2
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # general covariances: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), computed by eigen-decomposition
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)
    e, V = np.linalg.eigh(s1)
    root1 = V @ np.diag(np.sqrt(e)) @ V.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # from samples the estimate converges to the analytic value
    f1 = rng.multivariate_normal(mu1, s1, size=20000)
    f2 = rng.multivariate_normal(mu2, s2, size=20000)
    assert frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2)) == pytest.approx(want, rel=0.05)


def test_fid_with_a_pluggable_extractor():
    g = torch.Generator().manual_seed(0)
    real = [torch.rand(64, 3, 8, 8, generator=g) for _ in range(4)]
    shifted = [r + 0.3 for r in real]

    def pooled(batch):
        return torch.nn.functional.adaptive_avg_pool2d(batch, 2).flatten(1)

    assert fid(real, real, pooled) == pytest.approx(0.0, abs=1e-6)
    # a pure mean shift of 0.3 in each of the 12 features adds 12 * 0.09 to the distance
    assert fid(real, shifted, pooled) == pytest.approx(12 * 0.09, rel=1e-5)
