"""The detection stage: OpenCV HOG/Haar and torch backends in Ray actors, person crops with exact K,
rejections naming the stage and the score."""
import json
import os
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pytest
import yaml

import dataprep.store.ledger as ledgers
from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, DetectorConfig, PhotoFilters, Source
from dataprep.samples.detection import build_detector, detection_input
from pippo_common.errors import DataError
from dataprep.studio.geometry import crop_intrinsics, resize_intrinsics
from dataprep.inputs.photos import decode_photo
from dataprep.samples.make import photo_intrinsics
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_images
from dataprep.samples.tiny_detector import save_random_weights

RES = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A rendered person HOG finds (seed 9) and a landscape HOG scores but rejects (seed 0)."""
    root = tmp_path_factory.mktemp("photos")
    person = synth_images(root / "src", count=1, seed=9, person_fraction=1.0)[0]
    landscape = synth_images(root / "tmp", count=1, seed=0, person_fraction=0.0)[0]
    landscape = landscape.rename(root / "src" / "landscape.jpg")
    (root / "src" / "labels.json").unlink()
    return root / "src", person, landscape


def _build(tmp_path, src, **kw) -> dict:
    cfg = BuildConfig(dataset=str(tmp_path / "ds"), sources=[Source("images", str(src))], resolution=RES,
                      partitions=2, lossless=True, preview_samples=0, **kw)
    store = DatasetStore(cfg.dataset)
    v = store.describe(store.resolve(run_build(cfg, {})))
    samples = {}
    for shard in v["shards"]:
        with tarfile.open(shard["url"].removeprefix("file://")) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {"samples": samples, "ledger": {r["input"].rsplit("/", 1)[-1]: r for r in ledgers.ledger(store, v).to_pylist()}}


def _hog_best(path) -> float:
    rgb = decode_photo(path.read_bytes(), 10**8).rgb
    return build_detector(DetectorConfig(), faces=False).detect([detection_input(rgb, 640)[0]])[0].best_person


def test_person_photo_kept_and_cropped_landscape_rejected_with_its_score(photos, tmp_path, ray_local):
    src, person, landscape = photos
    out = _build(tmp_path, src, crop="person", filters=PhotoFilters(detect_person=True))
    reject = out["ledger"]["landscape.jpg"]
    best = _hog_best(landscape)
    assert best is not None and best < 0
    assert reject["status"] == "rejected" and reject["stage"] == "detect"
    assert reject["reason"] == f"no person detected (opencv): best score {best:.3f} < min score 0"

    (sample,) = out["samples"].values()
    meta = json.loads(sample["json"])
    det = meta["detections"]
    assert meta["crop_mode"] == "person" and det["backend"] == "opencv" and det["persons"]
    chosen = det["persons"][meta["person"]]
    assert chosen["score"] > 0
    # the square holds the person's box plus the margin, inside the photo
    x0, y0, side = meta["crop"]
    bx0, by0, bx1, by1 = chosen["box"]
    assert x0 <= bx0 and y0 <= by0 and bx1 <= x0 + side and by1 <= y0 + side
    assert side < min(meta["upright_width"], meta["upright_height"])       # not the centre square
    assert side >= 0.99 * max(bx1 - bx0, by1 - by0) * 1.4                 # margin 0.2 a side
    # the stored pixels are that crop of the photo, resized
    rgb = decode_photo(person.read_bytes(), 10**8).rgb
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expected = cv2.resize(rgb[y0:y0 + side, x0:x0 + side], (RES, RES), interpolation=cv2.INTER_AREA)
    assert stored.shape == (RES, RES, 3) and np.abs(stored.astype(int) - expected).max() <= 1
    # K describes the stored pixels exactly: a stored pixel and the source pixel it samples
    # (half-pixel rule) look along the same ray of the photo's synthetic camera
    K = np.array(meta["K"])
    K_src = photo_intrinsics(meta["upright_width"], meta["upright_height"])
    np.testing.assert_allclose(K, resize_intrinsics(crop_intrinsics(K_src, x0, y0), RES / side))
    for u, v in [(0, 0), (RES - 1, 0), (17, 40), (RES - 1, RES - 1)]:
        x = x0 + (u + 0.5) * side / RES - 0.5
        y = y0 + (v + 0.5) * side / RES - 0.5
        np.testing.assert_allclose(np.linalg.solve(K, [u, v, 1.0]), np.linalg.solve(K_src, [x, y, 1.0]),
                                   atol=1e-12)


def test_torch_backend_with_random_weights_through_the_ray_stage(photos, tmp_path, ray_local):
    src, person, landscape = photos
    weights = save_random_weights(str(tmp_path / "tiny.safetensors"), seed=1)
    detector = DetectorConfig(backend="torch", weights=weights, min_person_score=0.0, batch_size=2)
    out = _build(tmp_path, src, crop="person", detector=detector)
    assert len(out["samples"]) == 2 and not [r for r in out["ledger"].values() if r["status"] != "kept"]
    for sample in out["samples"].values():
        meta = json.loads(sample["json"])
        det = meta["detections"]
        assert det["backend"] == "torch" and det["persons"] and "keypoints" not in det["persons"][0]
        assert all(0.0 <= p["score"] <= 1.0 for p in det["persons"])
        x0, y0, side = meta["crop"]
        bx0, by0, bx1, by1 = det["persons"][meta["person"]]["box"]
        assert x0 <= bx0 + 1 and y0 <= by0 + 1 and bx1 <= x0 + side + 1 and by1 <= y0 + side + 1


def test_torch_backend_refuses_weights_that_are_not_safetensors(photos, tmp_path, ray_local):
    """A pickle named .safetensors is refused unread (never unpickled), before any input is read."""
    src, _, _ = photos
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + os.urandom(64))
    cfg = DetectorConfig(backend="torch", weights=str(bad))
    with pytest.raises(DataError, match="do not fit"):
        _build(tmp_path, src, crop="person", detector=cfg)
    with pytest.raises(DataError, match="required for the torch backend"):
        _build(tmp_path, src, detector=DetectorConfig(backend="torch"), filters=PhotoFilters(detect_person=True))


def test_cli_build_with_missing_detector_weights_is_one_line(photos, tmp_path):
    src, _, _ = photos
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({"dataset": str(tmp_path / "ds"), "sources": [{"kind": "images", "uri": str(src)}],
                                      "crop": "person", "detector": {"backend": "torch",
                                                                     "weights": str(tmp_path / "none.safetensors")}}))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "build", str(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("pippo: error: detector.weights")
    assert "Traceback" not in proc.stderr
