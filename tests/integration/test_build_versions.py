"""Versions as lists of parts (issue 9): O(delta) incremental builds, source changes, takedowns,
compaction, and gc that cannot lose data."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dataprep.store.ledger as ledgers
from dataprep.store.gc import collect
from dataprep.build.job import run_build
from pippo_common.errors import DataError
from dataprep.build.records import PartitionTask
from dataprep.build.partition_job import process_partition
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_capture, synth_images
from support import PARTITIONS, build_in, cfg_for, samples_of

class OpenLog:
    """Paths under `root` opened by this process (Python's audit hook on `open`)."""
    hooked = False
    active = None

    def __init__(self, root):
        self.root, self.paths = str(root), []
        if not OpenLog.hooked:
            sys.addaudithook(OpenLog._hook)
            OpenLog.hooked = True

    @staticmethod
    def _hook(event, args):
        log = OpenLog.active
        if log is not None and event == "open" and isinstance(args[0], str) and args[0].startswith(log.root):
            mode, flags = args[1], args[2]
            reading = ("r" in mode and "+" not in mode) if isinstance(mode, str) else not flags & (os.O_WRONLY | os.O_RDWR)
            if reading:
                log.paths.append(os.path.relpath(args[0], log.root))

    def __enter__(self):
        OpenLog.active = self
        return self

    def __exit__(self, *exc):
        OpenLog.active = None


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    synth_images(root / "dir", count=12, seed=71, person_fraction=1.0)
    synth_images(root / "listed", count=6, seed=72, person_fraction=1.0)
    (root / "list.txt").write_text("\n".join(f"listed/{p.name}" for p in sorted((root / "listed").glob("*.*g"))) + "\n")
    return root


def test_incremental_build_reads_only_its_delta(photos, tmp_path, ray_local):
    src = tmp_path / "src"
    shutil.copytree(photos, src)
    store = DatasetStore(tmp_path / "ds")
    sources = [("images", src / "dir"), ("urls", src / "list.txt")]
    v1 = build_in(store, sources)
    assert v1["samples"] == 18 and v1["counts"] == {"inputs": 18, "kept": 18, "rejected": 0, "removed": 0}
    # the list file the parent consumed whole is not read again: garble it, same size and mtime
    listing = src / "list.txt"
    st = listing.stat()
    listing.write_bytes(b"#" * st.st_size)
    os.utime(listing, ns=(st.st_atime_ns, st.st_mtime_ns))
    synth_images(src / "new", count=1, seed=73, person_fraction=1.0)
    new = next((src / "new").glob("*.*g"))
    shutil.move(new, src / "dir" / "zz_new.jpg")
    parts_before = {p: p.stat().st_mtime_ns for p in (Path(store.root) / "parts").rglob("*") if p.is_file()}
    with OpenLog(store.root) as driver:
        vid = run_build(cfg_for(store, sources), {})
    v2 = store.describe(store.resolve(vid))
    assert v2["parent"] == v1["id"] and v2["samples"] == 19 and v2["stats"]["new_samples"] == 1
    assert v2["counts"]["removed"] == 0          # the garbled list was never parsed
    # the driver read of the parent: its record and its parts list, nothing per input
    parent_files = {p for p in driver.paths if v1["id"] in p or p.startswith("parts/")}
    assert parent_files <= {f"versions/{v1['id']}.json", f"versions/{v1['id']}/parts.parquet"}, parent_files
    # nothing written before was rewritten; only the new partition's parts (ledger + sha) are new
    after = {p: p.stat().st_mtime_ns for p in (Path(store.root) / "parts").rglob("*") if p.is_file()}
    assert all(after[p] == t for p, t in parts_before.items())
    assert len([p for p in after if p not in parts_before and p.suffix == ".json"]) == 2
    # a partition job reads only the parent parts of its own partition
    parent = store.resolve(v1["id"])
    parts = store.version_parts(parent)
    p = next(r["partition"] for r in parts if r["kind"] == "ledger")
    mine = [r for r in parts if r["partition"] == p and r["kind"] == "ledger"]
    with OpenLog(store.root) as job:
        process_partition(PartitionTask(p, PARTITIONS, PARTITIONS, store.uri, parent["recipe"], mine, [],
                                        dry_run=True), cfg_for(store, sources))
    read = {x for x in job.paths if x.startswith("parts/")}
    assert read and read == {f"parts/{parent['recipe']}/{r['part']}{s}" for r in mine
                             for s in (".json", ".ledger.parquet")}


def dataset_of(photos, tmp_path):
    """A copy of the photo directory and a first version built from it."""
    src = tmp_path / "src"
    shutil.copytree(photos / "dir", src)
    store = DatasetStore(tmp_path / "ds")
    return src, store, build_in(store, [("images", src)])


def test_source_changes_retries_takedown_and_compaction(photos, tmp_path, ray_local):
    src, store, v1 = dataset_of(photos, tmp_path)
    keys1 = set(samples_of(v1))
    kept = DatasetStore(tmp_path / "kept")
    build_in(kept, [("images", src)])
    # a photo deleted from its source is dropped from the next version and recorded as removed
    gone = sorted(src.glob("*.*g"))[0]
    gone.unlink()
    v2 = build_in(store, [("images", src)])
    assert v2["samples"] == 11 and v2["counts"]["removed"] == 1 and v2["counts"]["inputs"] == 12
    ledger = {r["input"]: r for r in ledgers.ledger(store, v2).to_pylist()}
    assert ledger[f"file://{gone}"]["status"] == "removed"
    assert len(samples_of(v2)) == 11 and set(samples_of(v2)) < keys1
    # ... unless configured to keep it
    v2_kept = build_in(kept, [("images", src)], on_missing="keep")
    assert v2_kept["samples"] == 12 and v2_kept["counts"]["removed"] == 0
    # a takedown: a version without the listed inputs, shards rewritten without them
    victim = sorted(src.glob("*.*g"))[0]
    takedown = tmp_path / "takedown.txt"
    takedown.write_text(f"file://{victim}\nfile:///not/in/the/version.jpg\n")
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "remove", f"{store.uri}@{v2['id']}",
                          "--inputs", str(takedown)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    v3 = store.describe(store.resolve(out.stdout.strip().splitlines()[-1]))
    assert "removed 1 inputs (1 listed inputs were not in the version)" in out.stderr
    assert v3["parent"] == v2["id"] and v3["samples"] == 10 and v3["counts"]["removed"] == 2
    assert v3["stats"]["bytes"] == sum(s["bytes"] for s in v3["shards"])
    victim_key = next(r["key"] for r in ledgers.ledger(store, v2).to_pylist() if r["input"] == f"file://{victim}")
    assert victim_key not in samples_of(v3) and set(samples_of(v3)) == set(samples_of(v2)) - {victim_key}
    # compaction: the same samples in fewer parts and shards
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "compact", f"{store.uri}@{v3['id']}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    v4 = store.describe(store.resolve(out.stdout.strip().splitlines()[-1]))
    assert v4["counts"] == v3["counts"] and v4["samples"] == 10
    assert v4["stats"]["bytes"] == sum(s["bytes"] for s in v4["shards"])
    assert samples_of(v4) == samples_of(v3)
    assert v4["stats"]["parts"] < v3["stats"]["parts"] and len(v4["shards"]) <= len(v3["shards"])
    # an incremental build on the compacted version knows every input, and a taken-down input
    # stays out although its file is still there
    v5 = build_in(store, [("images", src)])
    assert v5["id"] == v4["id"]


def test_gc_cannot_lose_data(photos, tmp_path, ray_local):
    src, store, v1 = dataset_of(photos, tmp_path)
    keys = set(samples_of(v1))
    # a foreign file in the dataset directory is never deleted, even old and unreferenced
    foreign = Path(store.root) / "shards" / "notes.tar"
    foreign.write_bytes(b"mine")
    os.utime(foreign, (0, 0))
    result = collect(store, grace_s=0)
    assert foreign.exists() and result["foreign"] >= 1 and result["deleted"] == 0
    # a copied store and a symlinked store read and gc on their own
    copy = DatasetStore(tmp_path / "copy")
    shutil.copytree(store.root, copy.root)
    link = tmp_path / "link"
    link.symlink_to(store.root)
    for other in (copy, DatasetStore(link)):
        assert set(samples_of(other.describe(other.resolve("latest")))) == keys
        assert collect(other, grace_s=0)["deleted"] == 0
    shutil.rmtree(store.root + "/shards")
    assert set(samples_of(copy.describe(copy.resolve("latest")))) == keys      # the copy stands alone
    shutil.rmtree(store.root)
    shutil.copytree(copy.root, store.root)
    # gc refuses negatives and non-datasets, each in one line
    for argv in (["data", "gc", store.uri, "--keep-last", "-1"], ["data", "gc", str(src)]):
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    # a build refuses a non-empty directory without the marker
    with pytest.raises(DataError, match="not empty"):
        run_build(cfg_for(DatasetStore(src), [("images", src)]), {})
    # a parent shard deleted before a child build: the build fails before it commits, in one line
    shard = Path(store.root) / store.rel(store.version_shards(store.resolve("latest"))[0]["url"])
    data = shard.read_bytes()
    shard.unlink()
    synth_images(src / "more", count=1, seed=74, person_fraction=1.0)
    with pytest.raises(Exception, match="lost shard"):
        build_in(store, [("images", src)])
    assert [v["id"] for v in store.versions()] == [v1["id"]]
    shard.write_bytes(data)
    # gc racing a starting build: the build's lease (taken before it resolves its parent) keeps
    # the recipe's files, so the build finds and reuses them even though gc un-listed the parent
    from dataprep.store.core import BuildLease
    with BuildLease(store, v1["recipe"], None):
        dry = collect(store, keep_last=0, grace_s=0, dry_run=True)
        assert dry["versions_dropped"] == [v1["id"]] and store.versions()      # dry run: nothing changes
        collect(store, keep_last=0, grace_s=0)
    assert store.versions() == []
    v2 = build_in(store, [("images", src)])
    assert v2["stats"]["parts_reused"] >= 1 and keys < set(samples_of(v2))
    # untag; gc after un-listing deletes only unreferenced store files
    store.tag(v2["id"], "t")
    assert store.untag("t") == v2["id"] and store.resolve(v2["id"])["tags"] == []
    before = {p for p in Path(store.root).rglob("*") if p.is_file()}
    collect(store, grace_s=0)
    after = {p for p in Path(store.root).rglob("*") if p.is_file()}
    assert foreign in after and set(samples_of(store.describe(store.resolve(v2["id"])))) == set(samples_of(v2))
    assert all("/shards/" in str(p) or "/parts/" in str(p) or "/versions/" in str(p) or "/builds/" in str(p)
               for p in before - after)


def test_dry_run_plans_without_writing(photos, tmp_path, ray_local):
    store = DatasetStore(tmp_path / "ds")
    plan = run_build(cfg_for(store, [("images", photos / "dir")]), {}, dry_run=True)
    assert plan["listed"] == 12 and plan["new_inputs"] == 12 and plan["partitions"] == PARTITIONS
    assert not Path(store.root).exists()


def test_read_version_reads_a_whole_mixed_version_with_ray_data(photos, tmp_path, ray_local):
    """Issue 16, item 8: Ray Data's stock `read_webdataset` on a whole version mixing studio and
    photo samples. With its defaults the rows of a photo shard and a studio shard merged into one
    block fail to cast (NaN in the other kind's image columns); `read_version` reads with the stock
    reader and one schema for every kind. One read task (override_num_blocks=1) forces the merge."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from dataprep.store.reader import read_version

    caps = tmp_path / "caps"
    synth_capture(caps / "c0", cameras=3, frames=2, height=64, width=48, seed=75)
    store = DatasetStore(tmp_path / "ds")
    v = build_in(store, [("captures", caps), ("images", photos / "dir")], partitions=1)
    assert {s["url"].rsplit("-", 1)[1][0] for s in v["shards"]} == {"s", "i"}     # both kinds of shards
    for ds in (read_version(f"{store.uri}@{v['id']}"), read_version(f"{store.uri}@latest", override_num_blocks=1)):
        rows = ds.take_all()
        assert len(rows) == v["samples"] == 14
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):   # blocks of both kinds
            assert set(batch.column_names) >= {"kind", "json", "images", "plucker", "anchor"}
    kinds = {r["kind"] for r in rows}
    assert kinds == {"studio", "image"}
    for r in rows:
        meta = json.loads(r["json"])
        images = [np.asarray(Image.open(io.BytesIO(b))) for b in r["images"]]
        if r["kind"] == "studio":
            assert len(images) == len(meta["views"]) == 3
            assert np.load(io.BytesIO(r["plucker"])).shape[:2] == (3, 6)
        else:
            assert len(images) == 1 and images[0].shape == (meta["height"], meta["width"], 3)
            assert r["plucker"] == b"" and r["anchor"] == b""
        assert r["__key__"] and r["__url__"].endswith(".tar")


def test_failed_downloads_are_retried_a_bounded_number_of_times(photos, tmp_path, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(next((photos / "dir").glob("*.*g")), src / "ok.jpg")
    (src / "urls.txt").write_text("ok.jpg\nmissing.jpg\n")
    store = DatasetStore(tmp_path / "ds")
    ids, attempts = [], []
    for _ in range(3):
        v = build_in(store, [("urls", src / "urls.txt")], max_attempts=2)
        row = next(r for r in ledgers.ledger(store, v).to_pylist() if r["input"].endswith("missing.jpg"))
        ids.append(v["id"])
        attempts.append((row["status"], row["stage"], row["attempts"]))
    assert attempts == [("rejected", "fetch", 1), ("rejected", "fetch", 2), ("rejected", "fetch", 2)]
    assert ids[1] != ids[0] and ids[2] == ids[1]          # the third build has nothing left to try
    assert v["samples"] == 1 and v["counts"]["inputs"] == 2
