"""Crash, re-run, concurrency, incremental builds and gc of the build job (real processes)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import dataprep.store.ledger as ledgers
from dataprep.store.gc import collect
from dataprep.build_config import PhotoFilters, ShardLimits
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_capture, synth_images
from support import build, samples_of


def write_config(path, dataset, sources, **extra):
    cfg = {"dataset": str(dataset), "sources": [{"kind": k, "uri": str(u)} for k, u in sources],
           "resolution": 64, "plucker_stride": 4, "partitions": 3, "workers": 2,
           "shard": {"max_samples": 3}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def pippo_build(config, *overrides, **popen):
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "data", "build", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1], err


def content(version):
    """What a version holds, independent of where: key -> {member: bytes}."""
    return samples_of(version)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    synth_capture(root / "caps" / "c0", cameras=3, frames=3, height=64, width=48, seed=3)
    synth_images(root / "photos", count=14, seed=4, person_fraction=1.0)
    return root


def test_sigkill_then_rerun_gives_the_uninterrupted_result(sources, tmp_path):
    srcs = [("captures", sources / "caps"), ("images", sources / "photos")]
    reference = DatasetStore(tmp_path / "ref")
    finish(pippo_build(write_config(tmp_path / "ref.yaml", reference.uri, srcs)))
    store = DatasetStore(tmp_path / "ds")
    cfg = write_config(tmp_path / "ds.yaml", store.uri, srcs)
    proc = pippo_build(cfg)
    parts = os.path.join(store.root, "parts")

    def finished_parts():
        """Ledger parts whose record (their last write) is there."""
        n = 0
        for root, _, files in os.walk(parts):
            for name in files:
                if name.endswith(".json"):
                    with open(os.path.join(root, name)) as f:
                        n += json.load(f)["kind"] == "ledger"
        return n

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = finished_parts()
        if done >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.versions() == []                     # nothing half-listed
    assert finished_parts() >= 1
    vid, err = finish(pippo_build(cfg))
    v = store.describe(store.resolve(vid))
    assert v["stats"]["parts_reused"] >= 1
    ref = reference.describe(reference.resolve("latest"))
    assert (v["samples"], v["rejected"]) == (ref["samples"], ref["rejected"]) == (17, 0)
    assert content(v) == content(ref)
    # the same command once more changes nothing
    assert finish(pippo_build(cfg))[0] == vid
    assert len(store.versions()) == 1


def test_concurrent_commits_both_end_as_valid_versions(sources, tmp_path):
    store = DatasetStore(tmp_path / "ds")
    a = pippo_build(write_config(tmp_path / "a.yaml", store.uri, [("captures", sources / "caps")], parent=None))
    b = pippo_build(write_config(tmp_path / "b.yaml", store.uri, [("images", sources / "photos")], parent=None))
    vid_a, _ = finish(a)
    vid_b, _ = finish(b)
    assert vid_a != vid_b
    listed = {v["id"]: v for v in store.versions()}
    assert set(listed) == {vid_a, vid_b}
    assert listed[vid_a]["samples"] == 3 and listed[vid_b]["samples"] == 14
    for v in listed.values():
        assert len(content(store.describe(v))) == v["samples"]


def test_conditional_create_lets_exactly_one_writer_win(tmp_path, s3_server):
    import fsspec
    from concurrent.futures import ThreadPoolExecutor
    fsspec.filesystem("s3").mkdir("race")
    for uri in (tmp_path / "ds", "s3://race/ds"):
        store = DatasetStore(uri)
        path = store.path("versions", "abc.json")
        with ThreadPoolExecutor(8) as pool:
            wins = list(pool.map(lambda k: store.create_exclusive(path, json.dumps({"writer": k}).encode()), range(8)))
        assert sum(wins) == 1
        assert store.read_json(path)["writer"] == wins.index(True)


def small(store, srcs, **kw):
    kw = {"resolution": 64, "plucker_stride": 4, "partitions": 3, **kw}
    return store.describe(store.resolve(build(store.uri, srcs, **kw)))


def test_incremental_build_processes_only_new_inputs_and_reuses_shards(tmp_path, ray_local):
    photos = tmp_path / "photos"
    synth_images(photos, count=6, seed=11, person_fraction=1.0)
    store = DatasetStore(tmp_path / "ds")
    v1 = small(store, [("images", photos)])
    synth_images(tmp_path / "more", count=4, seed=12, person_fraction=1.0)
    for p in (tmp_path / "more").glob("*.*g"):
        p.rename(photos / f"new_{p.name}")
    v2 = small(store, [("images", photos)])
    assert v2["parent"] == v1["id"]
    assert v2["samples"] == 10 and v2["stats"]["new_samples"] == 4
    assert {s["url"] for s in v1["shards"]} <= {s["url"] for s in v2["shards"]}
    assert v2["stats"]["parts"] > v1["stats"]["parts"]     # new parts added, none rewritten
    # a photo copied under a new name is a duplicate of a parent sample
    (photos / "copy.jpg").write_bytes(next(photos.glob("photo_*.jpg")).read_bytes())
    v3 = small(store, [("images", photos)])
    rejects = ledgers.rejects(store, v3).to_pylist()
    assert v3["samples"] == 10 and rejects[-1]["stage"] == "dedup" and "(parent)" in rejects[-1]["reason"]
    # a new recipe builds everything again: `parent: latest` is the latest of the same recipe
    v4 = small(store, [("images", photos)], resolution=32)
    assert v4["parent"] is None and v4["stats"]["new_samples"] == 10
    assert not {s["url"] for s in v3["shards"]} & {s["url"] for s in v4["shards"]}


def test_gc_never_deletes_referenced_shards(sources, tmp_path, ray_local):
    store = DatasetStore(tmp_path / "ds")
    srcs = [("captures", sources / "caps")]
    v1 = small(store, srcs)
    v2 = small(store, srcs, resolution=32)            # another recipe: no shard shared with v1
    store.tag(v1["id"], "keep")
    stray = os.path.join(store.root, "shards", "0" * 16, "1" * 20 + "-i0000.tar")   # store naming
    os.makedirs(os.path.dirname(stray))
    open(stray, "wb").close()
    result = collect(store, keep_last=0)                    # default grace: the young stray stays
    assert result["deleted"] == 0 and os.path.exists(stray)
    assert {v["id"] for v in store.versions()} == {v1["id"]}   # untagged v2 un-listed, tagged v1 kept
    collect(store, grace_s=0)
    assert not os.path.exists(stray)
    for s in v1["shards"]:
        assert os.path.exists(s["url"].removeprefix("file://"))
    for s in v2["shards"]:
        assert not os.path.exists(s["url"].removeprefix("file://"))
    assert len(content(store.describe(store.resolve("keep")))) == v1["samples"]
    # rebuilding v2's recipe after gc rebuilds the units whose shards were deleted
    again = small(store, srcs, resolution=32, parent=None)
    assert len(content(again)) == again["samples"] == v2["samples"]


def test_unchanged_rebuild_of_tars_is_the_same_version_and_applies_new_tags(tmp_path, ray_local):
    import io
    import tarfile
    photos = tmp_path / "photos"
    synth_images(photos, count=3, seed=51, person_fraction=1.0)
    first = small(DatasetStore(tmp_path / "first"), [("images", photos)])
    tars = tmp_path / "tars"
    tars.mkdir()
    for k, shard in enumerate(first["shards"]):
        (tars / f"a{k}.tar").write_bytes(open(shard["url"].removeprefix("file://"), "rb").read())
    with tarfile.open(tars / "no_images.tar", "w") as tar:          # every member rejected
        info = tarfile.TarInfo("k1.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    tarfile.open(tars / "empty.tar", "w").close()                  # a tar with no member
    store = DatasetStore(tmp_path / "ds")
    filters = {"filters": PhotoFilters(min_side=32)}             # the first build's photos are 64 px
    v1 = small(store, [("webdataset", tars)], **filters)
    rejects = {r["input"].rsplit("/", 1)[-1]: r for r in ledgers.rejects(store, v1).to_pylist()}
    assert v1["samples"] == 3 and set(rejects) == {"no_images.tar#k1", "empty.tar"}
    assert rejects["empty.tar"]["reason"] == "tar holds no samples"
    v2 = small(store, [("webdataset", tars)], tags=["stable"], **filters)
    assert v2["id"] == v1["id"] and v2["stats"]["inputs"] == 5
    assert store.resolve("stable")["id"] == v1["id"]                # tagged although unchanged


def test_gc_spares_a_running_build_and_survives_killed_writes(sources, tmp_path, ray_local):
    from dataprep.store.core import BuildLease
    store = DatasetStore(tmp_path / "ds")
    v1 = small(store, [("captures", sources / "caps")])
    # an old unreferenced shard of a recipe a build is working on right now
    busy = os.path.join(store.root, "shards", "b" * 16, "c" * 20 + "-i0000.tar")
    os.makedirs(os.path.dirname(busy))
    open(busy, "wb").close()
    os.utime(busy, (0, 0))
    # a marker write killed half-way
    stale_tmp = os.path.join(store.root, "parts", v1["recipe"], "x.json.tmp-1234")
    open(stale_tmp, "w").write('{"trunc')
    os.utime(stale_tmp, (0, 0))
    with BuildLease(store, "b" * 16, v1["id"]):
        assert [lease["recipe"] for lease in store.live_leases()] == ["b" * 16]
        result = collect(store, keep_last=0, grace_s=0)
    assert os.path.exists(busy) and not os.path.exists(stale_tmp)
    assert [v["id"] for v in store.versions()] == [v1["id"]]         # the lease's parent stays listed
    assert result["versions_dropped"] == [] and store.live_leases() == []
    collect(store, grace_s=0)
    assert not os.path.exists(busy)
    assert len(content(store.describe(store.resolve(v1["id"])))) == v1["samples"]


def test_a_reused_part_whose_shard_vanished_is_rebuilt(sources, tmp_path, ray_local):
    store = DatasetStore(tmp_path / "ds")
    v1 = small(store, [("captures", sources / "caps")], parent=None)
    os.unlink(v1["shards"][0]["url"].removeprefix("file://"))
    v2 = small(store, [("captures", sources / "caps")], parent=None)
    assert v2["id"] == v1["id"]                  # rebuilt under the same names, to the same bytes
    for s in v2["shards"]:
        assert os.path.exists(s["url"].removeprefix("file://"))


def test_shards_respect_the_byte_bound(tmp_path, ray_local):
    synth_images(tmp_path / "photos", count=12, seed=61, person_fraction=1.0)
    store = DatasetStore(tmp_path / "ds")
    v = small(store, [("images", tmp_path / "photos")], partitions=1,
              shard=ShardLimits(max_samples=100, max_bytes=20_000))
    assert len(v["shards"]) > 1
    for s in v["shards"]:
        assert s["bytes"] <= 20_000 + 10_240 or s["samples"] == 1


def test_missing_source_fails_with_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "ds", [("images", tmp_path / "typo")])
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "build", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == f"pippo: error: images source {tmp_path / 'typo'} does not exist"
