"""Synthetic captures: exact rendering (surface points land where drawn), textures, anchors."""
import numpy as np

from dataprep.studio import synth
from dataprep.studio.anchors import draw_anchor
from dataprep.studio.capture import Capture
from dataprep.studio.geometry import camera_center, distort_points, project_with_depth


def test_surface_points_project_onto_pixels_of_their_texture_colour(tmp_path):
    """Sample points ON the figure (independently of any render), project them with the cameras
    read back from disk, and check the stored pixel there shows that point's texture colour."""
    cap = Capture(str(synth.synth_capture(tmp_path / "cap", cameras=3, frames=2, height=320, width=208, seed=9)))
    frame = cap.frames[1]
    pose = cap.head_pose(frame)
    rng = np.random.default_rng(0)
    checked = agree = 0
    for e in synth.figure(pose):
        local = rng.normal(size=(3000, 3))
        local /= np.linalg.norm(local, axis=1, keepdims=True)
        world = (local * e.radii) @ e.R.T + e.center
        colours = synth.texture(e.part, local)
        normals = (local / e.radii) @ e.R.T              # ellipsoid normal, world frame
        for cam_id in sorted(cap.cameras):
            cam = cap.camera(cam_id)
            image, labels = cap.image(cam_id, frame), cap.mask(cam_id, frame)
            uv, z = project_with_depth(cam.K, cam.R, cam.t, world)
            h, w = image.shape[:2]
            px = np.round(uv).astype(int)
            facing = np.einsum("nk,nk->n", normals, camera_center(cam.R, cam.t) - world) > 0
            inside = facing & (z > 0) & (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
            # visible = the pixel there belongs to this part and the point is within half a pixel
            # of its centre (texture is piecewise constant; cell borders are the only mismatches)
            near_centre = np.abs(uv - px).max(axis=1) < 0.1
            for k in np.flatnonzero(inside & near_centre):
                if labels[px[k, 1], px[k, 0]] != e.part:
                    continue              # occluded by another part (self-occlusion: `facing`)
                checked += 1
                agree += np.array_equal(image[px[k, 1], px[k, 0]], colours[k])
    assert checked > 1000
    assert agree / checked > 0.9, (agree, checked)


def test_rendered_surface_points_reproject_to_their_pixel_even_with_distortion():
    cams = synth.dome_cameras(3, 48, 32, seed=4, distortion=True)
    pose = synth.head_pose_for_frame(0)
    cams[0].dist = np.array([0.15, 0.05, 0.002, -0.002])     # strong, to be sure it matters
    shifts = []
    for cam in cams:
        assert cam.distorted
        out = synth.render(cam, 48, 32, pose)
        hit = np.isfinite(out["points"][..., 0])
        assert hit.mean() > 0.05
        ii, jj = np.nonzero(hit)
        ideal, _ = project_with_depth(cam.K, cam.R, cam.t, out["points"][hit])
        seen = distort_points(ideal, cam.K, cam.dist)
        assert np.abs(seen[:, 0] - jj).max() < 1e-6 and np.abs(seen[:, 1] - ii).max() < 1e-6
        shifts.append(np.abs(ideal - np.stack([jj, ii], 1)).max())
    assert shifts[0] > 0.1      # the lens model really moved pixels, so the check above means something


def test_anchor_origin_lands_on_projected_head_origin(synth_capture_dir):
    cap = Capture(str(synth_capture_dir))
    for frame in cap.frames:
        pose = cap.head_pose(frame)
        for cam_id in sorted(cap.cameras):
            cam = cap.camera(cam_id)
            h, w = cap.image_size(cam_id)
            a = draw_anchor(cam.K, cam.R, cam.t, h, w, pose, radius=4.0)
            expected, _ = project_with_depth(cam.K, cam.R, cam.t, pose[:, 3][None])
            assert np.abs(a.uv - expected[0]).max() < 1e-9
            # The drawn disc (white: all channels lit) is centred on the projected origin.
            white = (a.image.min(axis=0).astype(float) / 255.0) ** 2
            ii, jj = np.mgrid[0:h, 0:w]
            centroid = np.array([(white * jj).sum(), (white * ii).sum()]) / white.sum()
            assert np.abs(centroid - expected[0]).max() < 0.5, (cam_id, centroid, expected)


def test_anchor_behind_the_camera_is_flagged_and_not_drawn():
    K = np.array([[50.0, 0, 32], [0, 50, 32], [0, 0, 1]])
    R, t = np.eye(3), np.zeros(3)
    behind = np.concatenate([np.eye(3), [[0.0], [0.0], [-1.0]]], axis=1)
    a = draw_anchor(K, R, t, 64, 64, behind, axis_length=0.2)
    assert a.behind.all() and np.isnan(a.uv).all() and a.image.max() == 0
    # Straddling the camera plane: origin in front, z axis end behind -> z axis drawn, clipped.
    straddle = np.concatenate([np.diag([1.0, -1.0, -1.0]), [[0.02], [0.01], [0.1]]], axis=1)
    b = draw_anchor(K, R, t, 64, 64, straddle, axis_length=0.3)
    assert b.behind.tolist() == [False, False, False, True]
    assert np.isfinite(b.uv).all()
    blue_only = (b.image[2] > 0) & (b.image[0] == 0) & (b.image[1] == 0)
    assert blue_only.any()               # the visible part of the z axis is drawn


def test_dome_cameras_are_valid_portrait_and_aimed_at_the_head():
    from dataprep.studio.geometry import validate_camera
    cams = synth.dome_cameras(12, 256, 168, seed=1)
    assert len({c.id for c in cams}) == 12
    for c in cams:
        validate_camera(c.K, c.R, c.t)
        uv, z = project_with_depth(c.K, c.R, c.t, synth.HEAD_CENTER[None])
        assert z[0] > 1.5 and 0 < uv[0, 0] < 168 and 0 < uv[0, 1] < 256


def test_synth_images_vary_and_some_have_no_person(tmp_path):
    import json
    from PIL import Image
    paths = synth.synth_images(tmp_path, count=12, seed=3, person_fraction=0.7)
    labels = json.loads((tmp_path / "labels.json").read_text())
    sizes = {Image.open(p).size for p in paths}
    assert len(sizes) > 6
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    assert 0 < sum(labels.values()) < len(paths)
