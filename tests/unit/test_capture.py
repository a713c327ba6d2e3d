"""Capture reader and writer (SPEC §3): conventions, lazy zip access, and one clear error per fault."""
import json
import shutil
import zipfile

import fsspec
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dataprep.studio.capture import Camera, Capture, CaptureWriter, camera_to_krt
from dataprep.errors import CalibrationError, CaptureError


def random_cameras(rng, n):
    cams = []
    for k in range(n):
        K = np.array([[rng.uniform(300, 3000), 0, rng.uniform(100, 1300)],
                      [0, rng.uniform(300, 3000), rng.uniform(100, 2000)], [0, 0, 1]])
        R = Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix()
        cams.append(Camera(f"{400000 + k}", K, R, rng.normal(0, 1.5, 3), rng.normal(0, 0.01, 4)))
    return cams


def write_capture(path, cams, frames=(0, 5), fmt="png", size=(12, 8)):
    w = CaptureWriter(path)
    w.write_calibration(cams)
    w.write_frame_list(list(frames))
    rng = np.random.default_rng(0)
    for f in frames:
        w.add_head_pose(f, np.concatenate([np.eye(3), [[0.1], [0.2], [1.6]]], axis=1))
        for c in cams:
            w.add_image(c.id, f, rng.integers(0, 255, (*size, 3), dtype=np.uint8), fmt)
    return w.commit()


def test_calibration_round_trip_in_spec_form(tmp_path):
    rng = np.random.default_rng(1)
    cams = random_cameras(rng, 5)
    path = write_capture(tmp_path / "cap", cams)
    # The stored form really is SPEC §3: K and T transposed, translation in millimetres.
    raw = json.loads((path / "camera_calibration.json").read_text())["KRT"][0]
    np.testing.assert_array_equal(np.array(raw["K"]), cams[0].K.T)
    T = np.array(raw["T"]).T
    np.testing.assert_allclose(T[:3, 3], cams[0].t * 1000, rtol=1e-15)
    np.testing.assert_array_equal(T[:3, :3], cams[0].R)
    cap = Capture(str(path))
    for c in cams:
        got = cap.camera(c.id)
        for a, b in ((got.K, c.K), (got.R, c.R), (got.t, c.t), (got.dist, c.dist)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert cap.frames == [0, 5]
    assert cap.image_size(cams[0].id) == (12, 8)
    np.testing.assert_allclose(cap.head_pose(5)[:, 3], [0.1, 0.2, 1.6], atol=1e-12)


@pytest.mark.parametrize("fmt", ["png", "jpg", "avif"])
def test_frames_decode_from_zips_in_each_format(tmp_path, fmt):
    cams = random_cameras(np.random.default_rng(2), 1)
    path = write_capture(tmp_path / "cap", cams, frames=(3,), fmt=fmt, size=(32, 24))
    img = Capture(str(path)).image(cams[0].id, 3)
    assert img.shape == (32, 24, 3) and img.dtype == np.uint8
    with zipfile.ZipFile(path / "image" / f"cam{cams[0].id}.zip") as zf:
        assert zf.namelist() == [f"cam{cams[0].id}/000003.{fmt}"]


def test_reads_lazily_through_an_fsspec_url(synth_capture_dir):
    mem = fsspec.filesystem("memory")
    mem.put(str(synth_capture_dir), "/caps/cap0", recursive=True)
    local, remote = Capture(str(synth_capture_dir)), Capture("memory:///caps/cap0")
    cam_id = sorted(local.cameras)[0]
    np.testing.assert_array_equal(local.image(cam_id, 10), remote.image(cam_id, 10))
    np.testing.assert_array_equal(local.mask(cam_id, 0), remote.mask(cam_id, 0))
    assert remote.describe()["frames"] == [0, 10]


def corrupt(tmp_path, synth_capture_dir, edit):
    path = tmp_path / "cap"
    shutil.copytree(synth_capture_dir, path)
    edit(path)
    return path


def edit_calibration(change):
    def edit(path):
        f = path / "camera_calibration.json"
        data = json.loads(f.read_text())
        change(data["KRT"][1])
        f.write_text(json.dumps(data))
    return edit


def set_T(fn):
    def change(entry):
        T = np.array(entry["T"]).T
        fn(T)
        entry["T"] = T.T.tolist()
    return change


def _skew(T):
    T[0, 1] += 0.05


def _flip(T):
    T[2, :3] *= -1


def _nan(T):
    T[1, 3] = float("nan")


def _neg_focal(entry):
    K = np.array(entry["K"]).T
    K[0, 0] = -K[0, 0]
    entry["K"] = K.T.tolist()


@pytest.mark.parametrize("change, message", [
    (set_T(_skew), "not orthonormal"),
    (set_T(_flip), "det"),
    (set_T(_nan), "non-finite"),
    (_neg_focal, "focal lengths must be positive"),
])
def test_bad_calibration_gives_one_clear_error(tmp_path, synth_capture_dir, change, message):
    path = corrupt(tmp_path, synth_capture_dir, edit_calibration(change))
    bad_id = json.loads((path / "camera_calibration.json").read_text())["KRT"][1]["cameraId"]
    with pytest.raises(CalibrationError, match=message) as info:
        Capture(str(path))
    assert f"cap: camera {bad_id}" in str(info.value) and "\n" not in str(info.value)
    # Non-strict reading keeps the other cameras and records the reason.
    cap = Capture(str(path), strict=False)
    assert bad_id not in cap.cameras and len(cap.cameras) == 5
    assert message in cap.invalid_cameras[bad_id]


def test_missing_camera_zip(tmp_path, synth_capture_dir):
    cam_id = sorted(Capture(str(synth_capture_dir)).cameras)[2]
    path = corrupt(tmp_path, synth_capture_dir, lambda p: (p / "image" / f"cam{cam_id}.zip").unlink())
    cap = Capture(str(path))
    with pytest.raises(CaptureError, match=f"camera {cam_id} frame 0: missing image/cam{cam_id}.zip"):
        cap.image(cam_id, 0)


def test_truncated_camera_zip(tmp_path, synth_capture_dir):
    cam_id = sorted(Capture(str(synth_capture_dir)).cameras)[0]

    def truncate(p):
        f = p / "image" / f"cam{cam_id}.zip"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cap = Capture(str(corrupt(tmp_path, synth_capture_dir, truncate)))
    with pytest.raises(CaptureError, match=f"cap: camera {cam_id} frame 10: .*not a readable zip"):
        cap.image(cam_id, 10)


def test_corrupt_member(tmp_path, synth_capture_dir):
    cam_id = sorted(Capture(str(synth_capture_dir)).cameras)[0]

    def garble(p):
        f = p / "image" / f"cam{cam_id}.zip"
        with zipfile.ZipFile(f, "w") as zf:
            zf.writestr(f"cam{cam_id}/000000.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cap = Capture(str(corrupt(tmp_path, synth_capture_dir, garble)))
    with pytest.raises(CaptureError, match=f"camera {cam_id} frame 0: cannot decode image"):
        cap.image(cam_id, 0)


def test_missing_frame(tmp_path, synth_capture_dir):
    cap = Capture(str(synth_capture_dir))
    cam_id = sorted(cap.cameras)[0]
    with pytest.raises(CaptureError, match=f"camera {cam_id} frame 20: frame missing"):
        cap.image(cam_id, 20)
    with pytest.raises(CaptureError, match="frame 20 head pose"):
        cap.head_pose(20)


def test_missing_calibration_file(tmp_path, synth_capture_dir):
    path = corrupt(tmp_path, synth_capture_dir, lambda p: (p / "camera_calibration.json").unlink())
    with pytest.raises(CaptureError, match="missing camera_calibration.json"):
        Capture(str(path))


def test_writer_is_atomic(tmp_path):
    w = CaptureWriter(tmp_path / "cap")
    w.write_calibration(random_cameras(np.random.default_rng(0), 1))
    assert not (tmp_path / "cap").exists()          # nothing visible until commit
    w.commit()
    assert (tmp_path / "cap" / "camera_calibration.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cap"]


def test_camera_to_krt_uses_millimetres():
    cam = Camera("1", np.eye(3), np.eye(3), np.array([0.001, 2.0, -3.5]))
    T = np.array(camera_to_krt(cam)["T"]).T
    np.testing.assert_allclose(T[:3, 3], [1.0, 2000.0, -3500.0])
