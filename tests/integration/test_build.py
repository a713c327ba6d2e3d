"""The Ray Data build job end to end: sources -> shards -> a version; conservation; read-back."""
import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
from PIL import Image

from corpus import break_calibration, write_bad_photos
import dataprep.store.ledger as ledgers
from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, ShardLimits, Source
from dataprep.studio.geometry import plucker, resize_intrinsics
from pippo_common.storage import fs_and_path
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_capture, synth_images
from support import samples_of


def build(dataset, sources, **kw) -> str:
    kw.setdefault("partitions", 3)
    kw.setdefault("shard", ShardLimits(max_samples=5))
    cfg = BuildConfig(dataset=str(dataset), sources=[Source(k, str(u)) for k, u in sources], **kw)
    return run_build(cfg, {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    caps = root / "captures"
    good = synth_capture(caps / "cap_good", cameras=4, frames=2, height=96, width=64, seed=1, distortion=True)
    break_calibration(good, caps / "cap_nan_camera", "nan_camera")
    break_calibration(good, caps / "cap_bad_json", "json")
    synth_images(root / "photos", count=6, seed=2, person_fraction=1.0)
    expected = write_bad_photos(root / "photos" / "bad")
    return root, expected


def check_version(store, vid, corpus_expected):
    v = store.describe(store.resolve(vid))
    rejects = ledgers.rejects(store, v).to_pylist()
    inputs = ledgers.ledger(store, v).to_pylist()
    samples = samples_of(v)
    # conservation, and every reject has a stage and a reason
    assert len(samples) == v["samples"] == sum(s["samples"] for s in v["shards"])
    assert len(inputs) == v["samples"] + v["rejected"] == len(samples) + len(rejects)
    assert all(r["stage"] and r["reason"] for r in rejects)
    by_name = {r["input"].rsplit("/", 1)[-1]: r for r in rejects}
    for name, outcome in corpus_expected.items():
        if outcome == "kept":
            assert name not in by_name, by_name.get(name)
        else:
            assert by_name[name]["stage"] == outcome, (name, by_name.get(name))
    assert "bomb" in by_name["bomb.png"]["reason"]
    assert "empty" in by_name["zero.jpg"]["reason"]
    assert by_name["duplicate_b.jpg"]["reason"].startswith("duplicate of")
    # the capture whose calibration is not JSON: both frames rejected, naming the file
    bad_json = [r for r in rejects if "cap_bad_json" in r["input"]]
    assert len(bad_json) == 2 and all("not valid JSON" in r["reason"] for r in bad_json)
    return v, samples, rejects


def test_local_build_end_to_end(corpus, tmp_path, ray_local):
    root, expected = corpus
    store = DatasetStore(tmp_path / "ds")
    vid = build(store.uri, [("captures", root / "captures"), ("images", root / "photos")],
                resolution=64, plucker_stride=4, face_crop=True, face_resolution=32)
    v, samples, rejects = check_version(store, vid, expected)
    studio = {k: s for k, s in samples.items() if json.loads(s["json"])["kind"] == "studio"}
    photos = {k: s for k, s in samples.items() if json.loads(s["json"])["kind"] == "image"}
    assert len(studio) == 4 and len(photos) == 6 + 6
    # Plücker as stored equals dataprep.studio.geometry on the stored cameras (float16 rounding only)
    for s in studio.values():
        meta = json.loads(s["json"])
        P = np.load(io.BytesIO(s["plucker.npy"]), allow_pickle=False)
        assert P.dtype == np.float16 and P.shape == (len(meta["views"]), 6, 16, 16)
        assert meta["plucker_hw"] == [16, 16]
        for k, view in enumerate(meta["views"]):
            K = np.array(view["K"])
            exact = plucker(resize_intrinsics(K, 1 / 4), np.array(view["R"]), np.array(view["t"]), 16, 16)
            assert np.abs(P[k].astype(np.float32) - exact).max() < 2e-3
            img = np.asarray(Image.open(io.BytesIO(s[f"view{k:02d}.jpg"])))
            assert img.shape == (64, 64, 3)
            anchor = np.asarray(Image.open(io.BytesIO(s[f"view{k:02d}.anchor.png"])).convert("RGB"))
            u, v_ = view["anchor_uv"]
            assert anchor[int(round(v_)), int(round(u))].min() > 200        # white disc at anchor_uv
            assert f"view{k:02d}.mask.png" in s and f"face{k:02d}.jpg" in s
        # the NaN camera of cap_nan_camera is dropped, not the frame
        if "cap_nan_camera" in meta["source"]:
            assert len(meta["views"]) == 3 and len(meta["dropped_views"]) == 1
    # awkward photos were normalised to RGB and the EXIF rotation applied
    metas = {json.loads(s["json"])["source"].rsplit("/", 1)[-1]: json.loads(s["json"]) for s in photos.values()}
    m = metas["exif_rotated.jpg"]
    assert m["exif_rotated"] and (m["upright_width"], m["upright_height"]) == (m["orig_height"], m["orig_width"])
    assert metas["cmyk.jpg"]["source_mode"] == "CMYK" and metas["grey16.png"]["source_mode"].startswith("I")
    for s in photos.values():
        assert np.asarray(Image.open(io.BytesIO(s["jpg"]))).shape == (64, 64, 3)
    # every shard is a plain tar with no '/' or '..' in member names, and matches its manifest
    for shard in v["shards"]:
        path = fs_and_path(shard["url"])[1]
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert names and not any("/" in n or ".." in n for n in names)
        assert shard["samples"] == len({n.split(".", 1)[0] for n in names})
        assert shard["samples"] <= 5
    # ... and Ray Data reads the same samples
    ds = ray_local.data.read_webdataset([s["url"] for s in v["shards"]], decoder=None)
    assert ds.count() == v["samples"]
    # the version carries its stats and a preview
    stats = json.loads(fsspec.open(v["stats_url"]).open().read())
    assert stats["samples_by_kind"] == {"studio": 4, "image": 12}
    assert stats["rejected_by_stage"]["decode"] == 4 and stats["rejected_by_stage"]["capture"] == 2
    assert Image.open(fsspec.open(v["preview_url"]).open()).size[0] > 100


def test_s3_build_end_to_end(corpus, ray_local, s3_server):
    root, expected = corpus
    fs = fsspec.filesystem("s3")
    fs.mkdir("pippo-test")
    fs.put(str(root / "captures"), "pippo-test/raw/captures", recursive=True)
    fs.put(str(root / "photos"), "pippo-test/raw/photos", recursive=True)
    store = DatasetStore("s3://pippo-test/datasets/humans")
    vid = build(store.uri, [("captures", "s3://pippo-test/raw/captures"), ("images", "s3://pippo-test/raw/photos")],
                resolution=64, plucker_stride=4)
    assert store.uri.startswith("s3://")
    v = store.describe(store.resolve("latest"))
    assert v["id"] == vid and all(s["url"].startswith("s3://pippo-test/datasets/humans/") for s in v["shards"])
    assert v["samples"] == 16
    _, samples, _ = check_version(store, vid, {k: o for k, o in expected.items()})
    assert len(samples) == 16
