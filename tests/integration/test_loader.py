"""The training-data loader on real versions built by run_build from tiny synthetic data:
exact epochs over ranks and workers, sample-exact resume (same and other world size),
determinism, the per-stage batch contract, filtering, mixing, holdout and s3 reading."""
import dataclasses
import io
import json
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataprep.build_config import PhotoFilters, ShardLimits
from pippo_common.errors import DataError
from dataprep.studio.geometry import camera_center, plucker, project, resize_intrinsics
from dataprep.loader import DataSource, LoaderConfig, TrainingLoader, held_out
from dataprep.store.shards import INDEX_SCHEMA
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import HEAD_RADII, synth_capture, synth_images
from pipelines.training.engine import camera_inputs
from pippo_model.conditioning import camera_vectors
from support import build, samples_of

RES = 32
BUILD = dict(resolution=RES, plucker_stride=4, filters=PhotoFilters(min_side=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    """`mixed`: 8 studio frames (5 cameras, face crops) + 10 photos in uneven shards of <= 3;
    `photos`: 6 other photos in shards of 2. Values: the URI@id and the samples read back."""
    root = tmp_path_factory.mktemp("loader")
    for k in range(2):
        synth_capture(root / "caps" / f"c{k}", cameras=5, frames=4, height=64, width=48, seed=10 + k)
    synth_images(root / "photos_a", count=10, seed=3, person_fraction=1.0)
    synth_images(root / "photos_b", count=6, seed=4, person_fraction=1.0)
    out = {"root": root}
    for name, sources, kw in [
        ("mixed", [("captures", root / "caps"), ("images", root / "photos_a")],
         dict(face_crop=True, face_resolution=16, partitions=2, shard=ShardLimits(max_samples=3))),
        ("photos", [("images", root / "photos_b")], dict(shard=ShardLimits(max_samples=2)))]:
        vid = build(root / name, sources, **BUILD, **kw)
        store = DatasetStore(root / name)
        samples = samples_of(store.describe(store.resolve(vid)))
        kinds = {k: json.loads(s["json"])["kind"] for k, s in samples.items()}
        out[name] = {"ref": f"{root / name}@{vid}", "samples": samples,
                     "image": sorted(k for k, v in kinds.items() if v == "image"),
                     "studio": sorted(k for k, v in kinds.items() if v == "studio"),
                     "shards": [s["samples"] for s in store.version_shards(store.resolve(vid))]}
    assert len(out["mixed"]["studio"]) == 8 and len(out["mixed"]["image"]) == 10
    assert len(set(out["mixed"]["shards"])) > 1                       # uneven shards
    return out


def cfg_(**kw):
    base = dict(batch_size=2, num_workers=2, resolution=RES, shuffle_buffer=8, views=3)
    return LoaderConfig(**{**base, **kw})


def take(loader, batches):
    """The first `batches` batches of a fresh iterator, then the loader's state (JSON round trip)."""
    it = iter(loader)
    out = [next(it) for _ in range(batches)]
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    return out, state


def rows(batches):
    """(source, epoch, position, key) of every sample served."""
    return [(int(s), int(e), int(p), k) for b in batches
            for s, e, p, k in zip(b["_source"], b["_epoch"], b["_position"], b["keys"])]


def assert_epochs_exact(served, expected_keys, epochs, source=0):
    for epoch in epochs:
        got = [(p, k) for s, e, p, k in served if e == epoch and s == source]
        assert sorted(k for _, k in got) == sorted(expected_keys), f"epoch {epoch}"
        # positions and keys are one bijection 0..N-1 <-> keys
        assert sorted(p for p, _ in got) == list(range(len(expected_keys)))


def test_every_sample_once_per_epoch_over_ranks_and_workers(data):
    ref = data["mixed"]["ref"]
    for stage, kind in (("pretrain", "image"), ("mid", "studio")):
        served, per_rank = [], []
        for rank in range(2):
            loader = TrainingLoader([DataSource(ref)], stage, cfg_(), rank=rank, world_size=2)
            assert loader.samples_per_epoch == len(data["mixed"][kind])
            got = rows(take(loader, 10)[0])
            per_rank.append(sum(e == 0 for _, e, _, _ in got))
            served += got
        assert_epochs_exact(served, data["mixed"][kind], epochs=(0, 1))
        assert abs(per_rank[0] - per_rank[1]) <= 1                     # equal cut, +-1


def test_resume_mid_epoch_is_sample_exact_on_any_world_size(data):
    ref, keys = data["mixed"]["ref"], data["mixed"]["image"]
    cfg = cfg_(augment=False, seed=3)
    before, states = [], []
    for rank in range(2):
        batches, state = take(TrainingLoader([DataSource(ref)], "pretrain", cfg, rank=rank, world_size=2), 2)
        before += rows(batches)
        states.append(state)
    merged = TrainingLoader.merge_states(states)
    assert len({k for _, e, _, k in before if e == 0}) == len(before) == 8
    for world, workers in ((2, 2), (3, 1), (1, 0)):
        after, new_states = [], []
        for rank in range(world):
            loader = TrainingLoader([DataSource(ref)], "pretrain", dataclasses.replace(cfg, num_workers=workers),
                                    rank=rank, world_size=world, state=merged)
            batches, state = take(loader, 12)
            after += rows(batches)
            new_states.append(state)
        # before + after: epoch 0 exactly once (nothing repeated or skipped), then epoch 1 whole
        assert_epochs_exact(before + after, keys, epochs=(0,))
        assert_epochs_exact(after, keys, epochs=(1,))
        (vid, entry), = TrainingLoader.merge_states(new_states)["sources"].items()
        assert entry["consumed"][0][:1] == [0] and entry["consumed"][0][1] >= 2       # 0 and 1 complete
        assert entry["consumed"][0][2] == [[0, len(keys)]]


def test_resume_serves_exactly_the_holes_of_a_state(data):
    """A consumed set with holes (what shuffle buffers leave) is served back exactly."""
    ref, n = data["mixed"]["ref"], len(data["mixed"]["image"])
    cfg = cfg_(augment=False, num_workers=0)
    loader = TrainingLoader([DataSource(ref)], "pretrain", cfg)
    key_at = {p: k for _, e, p, k in rows(take(loader, 5)[0]) if e == 0}
    assert sorted(key_at) == list(range(n))
    state = loader.state_dict()
    (vid, entry), = state["sources"].items()
    entry["consumed"] = [[0, 1, [[1, 2], [4, 7]]]]                 # epoch 0: 1, 4, 5, 6 consumed
    served = []
    for rank in range(3):
        resumed = TrainingLoader([DataSource(ref)], "pretrain", dataclasses.replace(cfg, num_workers=1),
                                 rank=rank, world_size=3, state=state)
        served += [(p, k) for _, e, p, k in rows(take(resumed, 3)[0]) if e == 0]
    assert sorted(served) == [(p, key_at[p]) for p in (0, 2, 3, 7, 8, 9)]


def test_state_of_a_rank_stays_small_over_many_epochs(data):
    loader = TrainingLoader([DataSource(data["photos"]["ref"])], "pretrain", cfg_(num_workers=1, batch_size=3),
                            rank=0, world_size=2)
    _, state = take(loader, 40)                  # rank 0 holds 3 of the 6 photos: 40 epochs
    consumed = state["sources"][next(iter(state["sources"]))]["consumed"]
    assert consumed == [[0, 40, [[0, 3]]]], consumed


def test_deterministic_for_a_seed_reshuffled_per_epoch_and_seed(data):
    ref = data["mixed"]["ref"]

    def run(seed):
        return take(TrainingLoader([DataSource(ref)], "pretrain", cfg_(seed=seed)), 12)[0]

    a, b, c = run(0), run(0), run(1)
    assert rows(a) == rows(b)
    for x, y in zip(a, b):
        assert torch.equal(x["views"], y["views"]) and torch.equal(x["reference"], y["reference"])
    order = {e: [k for _, ee, _, k in rows(a) if ee == e] for e in (0, 1)}
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])
    assert [k for _, e, _, k in rows(c) if e == 0] != order[0]
    # augmentation is drawn per (seed, epoch, sample): the same photo differs between epochs
    first = {(e, k): b_["views"][i] for b_ in a for i, (e, k) in enumerate(zip(b_["_epoch"].tolist(), b_["keys"]))}
    key = order[0][0]
    assert not torch.equal(first[(0, key)], first[(1, key)])


def stored_image(raw: bytes) -> np.ndarray:
    """CHW float in [-1, 1] of a stored image, decoded with PIL (independently of the loader)."""
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1


def test_pretrain_batch_contract(data):
    samples = data["mixed"]["samples"]
    batch = next(iter(TrainingLoader([DataSource(data["mixed"]["ref"])], "pretrain", cfg_(batch_size=4))))
    assert batch["views"].shape == (4, 1, 3, RES, RES) and batch["reference"].shape == (4, 3, RES, RES)
    for name in ("views", "reference"):
        assert batch[name].dtype == torch.float32 and -1 <= batch[name].min() and batch[name].max() <= 1
    assert set(batch["keys"]) <= set(data["mixed"]["image"]) and "cameras" not in batch
    # augmented: the reference is not a copy of the target
    assert (batch["views"][:, 0] - batch["reference"]).abs().mean() > 0.05
    plain = TrainingLoader([DataSource(data["mixed"]["ref"])], "pretrain", cfg_(augment=False, num_workers=0))
    b = next(iter(plain))
    for i, key in enumerate(b["keys"]):
        expected = stored_image(samples[key]["jpg"])
        assert np.abs(b["views"][i, 0].numpy() - expected).max() < 0.05
        assert torch.equal(b["views"][i, 0], b["reference"][i])


def frontal_score(view, meta):
    """How squarely the camera sits in front of the face: the face looks along head +y."""
    head_R, head_t = np.array(meta["anchor"]["R"]), np.array(meta["anchor"]["t"])
    d = camera_center(view["R"], view["t"]) - head_t
    return head_R[:, 1] @ d / np.linalg.norm(d)


def test_mid_batch_frontal_reference_views_and_cameras(data):
    samples = data["mixed"]["samples"]
    loader = TrainingLoader([DataSource(data["mixed"]["ref"])], "mid", cfg_(batch_size=4, views=3))
    batches = take(loader, 2)[0]
    for batch in batches:
        # the SPEC cameras only: camera vectors are made on the model side (to_model_space)
        assert batch["views"].shape == (4, 3, 3, RES, RES) and batch["_R"].shape == (4, 3, 3, 3)
        assert batch["_t"].shape == (4, 3, 3) and batch["_R"].dtype == torch.float64
        assert "cameras" not in batch and "plucker" not in batch
        cameras = camera_inputs(batch)
        for i, key in enumerate(batch["keys"]):
            meta, raw = json.loads(samples[key]["json"]), samples[key]
            views, ref = meta["views"], int(batch["_reference_index"][i])
            # the reference is the view facing the head: its camera sees the nose side (the
            # point of the head ellipsoid along head +y is nearer than the head centre) ...
            head_R, head_t = np.array(meta["anchor"]["R"]), np.array(meta["anchor"]["t"])
            nose = head_t + head_R[:, 1] * HEAD_RADII[1]
            R, t = np.array(views[ref]["R"]), np.array(views[ref]["t"])
            assert (R @ nose + t)[2] < (R @ head_t + t)[2]
            # ... and the most frontal of all views
            assert frontal_score(views[ref], meta) == pytest.approx(max(frontal_score(v, meta) for v in views))
            assert np.abs(batch["reference"][i].numpy() - stored_image(raw[f"view{ref:02d}.jpg"])).max() < 0.05
            targets = batch["_view_index"][i].tolist()
            assert len(set(targets)) == 3 and ref not in targets      # 5 views: 4 others >= 3
            for slot, v in enumerate(targets):
                assert np.abs(batch["views"][i, slot].numpy() - stored_image(raw[f"view{v:02d}.jpg"])).max() < 0.05
            Rs = torch.tensor([views[v]["R"] for v in targets], dtype=torch.float64)
            ts = torch.tensor([views[v]["t"] for v in targets], dtype=torch.float64)
            assert torch.equal(batch["_R"][i], Rs) and torch.equal(batch["_t"][i], ts)
            assert torch.equal(cameras[i], camera_vectors(Rs, ts).float())   # as the loader made them
    # more target views than the sample has (5): every view used, repeated as evenly as possible
    many = next(iter(TrainingLoader([DataSource(data["mixed"]["ref"])], "mid", cfg_(views=7, num_workers=0))))
    for targets in many["_view_index"].tolist():
        counts = np.bincount(targets, minlength=5)
        assert counts.min() >= 1 and counts.max() <= 2


def test_post_batch_plucker_anchor_and_face_crops(data):
    samples = data["mixed"]["samples"]
    for res in (RES, 48):           # the stored side, and another one (anchors redrawn, K resized)
        loader = TrainingLoader([DataSource(data["mixed"]["ref"])], "post",
                                cfg_(batch_size=4, views=3, face_views=1, resolution=res))
        batch = next(iter(loader))
        assert batch["plucker"].shape == (4, 3, 6, 8, 8) and batch["plucker"].dtype == torch.float32
        assert batch["anchor"].shape == (4, 3, 3, res, res) and batch["views"].shape == (4, 3, 3, res, res)
        assert -1 <= batch["anchor"].min() and batch["anchor"].max() <= 1
        faces_seen = 0
        for i, key in enumerate(batch["keys"]):
            meta, raw = json.loads(samples[key]["json"]), samples[key]
            crops = {f["view"]: f for f in meta.get("face_views", [])}
            targets, is_face = batch["_view_index"][i].tolist(), batch["_face"][i].tolist()
            with_crop = [s for s, v in enumerate(targets) if v in crops]
            assert [s for s in range(3) if is_face[s]] == with_crop[:1]      # face_views=1: the first
            for slot, v in enumerate(targets):
                view = meta["views"][v]
                R, t = np.array(view["R"]), np.array(view["t"])
                src = crops[v] if is_face[slot] else view
                K = resize_intrinsics(np.array(src["K"]), res / src["width"])
                exact = plucker(resize_intrinsics(K, 8 / res), R, t, 8, 8)
                tol = 1e-5 if is_face[slot] else 2e-3                     # stored ones are float16
                assert np.abs(batch["plucker"][i, slot].numpy() - exact).max() < tol
                anchor = batch["anchor"][i, slot].numpy()
                if is_face[slot]:
                    faces_seen += 1
                    u, w = project(K, R, t, np.array(meta["anchor"]["t"])[None])[0]
                    if 0 <= u < res and 0 <= w < res:                       # white disc at the head
                        assert anchor[:, int(round(w)), int(round(u))].min() == 1.0
                    face = Image.open(io.BytesIO(raw[f"face{v:02d}.jpg"])).convert("RGB")
                    face = face.resize((res, res), Image.BILINEAR)
                    expected = np.asarray(face, np.float32).transpose(2, 0, 1) / 127.5 - 1
                    assert np.abs(batch["views"][i, slot].numpy() - expected).mean() < 0.05
                elif res == RES:
                    assert np.array_equal(anchor, stored_image(raw[f"view{v:02d}.anchor.png"]))
                elif not view["anchor_behind"]:     # redrawn at res: the disc where K resized puts it
                    u, w = np.array(view["anchor_uv"]) * res / RES + (res / RES - 1) / 2
                    if 0 <= u < res and 0 <= w < res:
                        assert anchor[:, int(round(w)), int(round(u))].min() == 1.0
        assert faces_seen >= 1


def test_stages_filter_mixed_versions_and_fail_fast(data):
    # mixed version: pretrain sees photos only, mid/post studio frames only (exact-epoch tests),
    # and a photos-only version has nothing for mid/post: one clear error, at once
    for stage in ("mid", "post"):
        start = time.time()
        with pytest.raises(DataError, match=f"no samples usable by stage '{stage}'"):
            TrainingLoader([DataSource(data["photos"]["ref"])], stage, cfg_())
        assert time.time() - start < 10
    with pytest.raises(DataError, match="< world_size"):
        TrainingLoader([DataSource(data["photos"]["ref"])], "pretrain", cfg_(), rank=0, world_size=7)
    with pytest.raises(DataError):
        TrainingLoader([DataSource(data["photos"]["ref"] + "0000")], "pretrain", cfg_())


def test_holdout_excluded_from_training_and_served_by_heldout_batch(data):
    keys = data["mixed"]["image"]
    # keys carry a hash of their input path (a tmp dir): pick a fraction that splits both kinds
    def splits(f, kind):
        return 0 < sum(held_out(k, f) for k in data["mixed"][kind]) < len(data["mixed"][kind])

    fraction = next(f for f in np.arange(0.2, 0.9, 0.05) if splits(f, "image") and splits(f, "studio"))
    held = [k for k in keys if held_out(k, fraction)]
    cfg = cfg_(holdout_fraction=fraction)
    loader = TrainingLoader([DataSource(data["mixed"]["ref"])], "pretrain", cfg)
    assert loader.samples_per_epoch == len(keys) - len(held)
    assert_epochs_exact(rows(take(loader, 8)[0]), sorted(set(keys) - set(held)), epochs=(0,))
    a, b = loader.heldout_batch(20), loader.heldout_batch(20)
    assert sorted(a["keys"]) == sorted(held) and a["keys"] == b["keys"]
    assert torch.equal(a["views"], b["views"]) and torch.equal(a["views"][:, 0], a["reference"])
    mid = TrainingLoader([DataSource(data["mixed"]["ref"])], "mid", cfg).heldout_batch(8)
    assert {k for k in data["mixed"]["studio"] if held_out(k, fraction)} == set(mid["keys"])
    assert mid["views"].shape[1:] == (3, 3, RES, RES) and mid["_R"].shape[1:] == (3, 3, 3)


def test_weighted_mixing_follows_weights_and_keeps_epochs_per_source(data):
    sources = [DataSource(data["mixed"]["ref"], weight=3.0), DataSource(data["photos"]["ref"], weight=1.0)]
    loader = TrainingLoader(sources, "pretrain", cfg_(batch_size=4, num_workers=0))
    assert [v["id"] for v in loader.versions] == [r.split("@")[1] for r in (s.dataset for s in sources)]
    served = rows(take(loader, 50)[0])
    share = sum(s == 0 for s, _, _, _ in served) / len(served)
    assert 0.67 < share < 0.83, share
    assert_epochs_exact(served, data["mixed"]["image"], epochs=(0, 1, 2), source=0)
    assert_epochs_exact(served, data["photos"]["image"], epochs=(0, 1, 2), source=1)


def test_s3_version_with_more_ranks_than_shards(data, s3_server):
    fsspec.filesystem("s3").mkdir("loader-test")
    dataset = "s3://loader-test/datasets/photos"
    vid = build(dataset, [("images", data["root"] / "photos_b")], **BUILD, partitions=2,
                shard=ShardLimits(max_samples=100))
    store = DatasetStore(dataset)
    assert len(store.version_shards(store.resolve(vid))) <= 2 < 3
    served = []
    for rank in range(3):
        loader = TrainingLoader([DataSource(f"{dataset}@{vid}")], "pretrain", cfg_(), rank=rank, world_size=3)
        assert loader.versions[0]["uri"] == dataset
        served += rows(take(loader, 4)[0])
    assert_epochs_exact(served, data["photos"]["image"], epochs=(0, 1))
    # range requests on the object store serve what streaming serves
    ranged, held_r = batches_of(f"{dataset}@{vid}", "pretrain", 3)
    streamed, held_s = batches_of(f"{dataset}@{vid}", "pretrain", 3, range_reads=False)
    assert_same_batches(ranged + [held_r], streamed + [held_s])


def test_incremental_version_reads_carried_over_shards(data, tmp_path):
    """A child version reuses its parent's shards (their manifest rows may lack index_url): the
    loader serves the parent's samples and the new ones, each once per epoch."""
    import shutil
    root = data["root"]
    photos = tmp_path / "photos"
    shutil.copytree(root / "photos_b", photos)
    build(tmp_path / "ds", [("images", photos)], **BUILD, shard=ShardLimits(max_samples=2))
    synth_images(photos / "more", count=3, seed=9, person_fraction=1.0)
    child = build(tmp_path / "ds", [("images", photos)], **BUILD, shard=ShardLimits(max_samples=2))
    store = DatasetStore(tmp_path / "ds")
    record = store.resolve(child)
    assert record["parent"] and record["samples"] == 9
    loader = TrainingLoader([DataSource(f"{tmp_path / 'ds'}@{child}")], "pretrain", cfg_(num_workers=1))
    batches, _ = take(loader, 5)                  # 10 samples: one epoch of 9 + 1
    keys = sorted(samples_of(store.describe(record)))
    assert_epochs_exact(rows(batches), keys, epochs=[0])


def test_heldout_cameras_never_train_and_are_the_targets_of_evaluation(data):
    """holdout_cameras: the same cameras of every frame never appear in a training batch (neither
    as target nor as reference); heldout_batch puts the targets there, for held-out frames and,
    with frames="seen", for training frames."""
    from dataprep.loader.decode import heldout_views

    samples = data["mixed"]["samples"]

    def held_ids(key):
        meta = json.loads(samples[key]["json"])
        return meta, {meta["views"][v]["camera_id"] for v in heldout_views(meta, 0.3)}

    cfg = cfg_(holdout_fraction=0.3, holdout_cameras=0.3, views=2, num_workers=0)
    for stage in ("mid", "post"):
        loader = TrainingLoader([DataSource(data["mixed"]["ref"])], stage, cfg)
        trained_keys = set()
        for batch in take(loader, 6)[0]:
            for i, key in enumerate(batch["keys"]):
                meta, held = held_ids(key)
                assert 0 < len(held) < len(meta["views"])
                used = batch["_view_index"][i].tolist() + [int(batch["_reference_index"][i])]
                assert not {meta["views"][v]["camera_id"] for v in used} & held
                trained_keys.add(key)
        heldout_frames = set(loader.heldout_batch(20)["keys"])
        assert heldout_frames and not heldout_frames & trained_keys
        for frames in ("heldout", "seen"):
            batch = loader.heldout_batch(4, frames=frames)
            assert (set(batch["keys"]) <= heldout_frames) is (frames == "heldout")
            assert (not set(batch["keys"]) & heldout_frames) is (frames == "seen")
            for i, key in enumerate(batch["keys"]):
                meta, held = held_ids(key)
                assert {meta["views"][v]["camera_id"] for v in batch["_view_index"][i].tolist()} <= held
                assert meta["views"][int(batch["_reference_index"][i])]["camera_id"] not in held
            assert batch["_head"].shape[1:] == (3, 4)


# ---- byte offsets in the shard index: range reads vs streaming -------------------------------------

def copy_version(data, dst):
    """A copy of the mixed version (records store relative URLs: a copied dataset still works)."""
    import shutil
    src = data["mixed"]["ref"].rsplit("@", 1)
    shutil.copytree(src[0], dst)
    store = DatasetStore(dst)
    return store, store.version_shards(store.resolve(src[1])), f"{dst}@{src[1]}"


def local(url: str) -> str:
    return url.removeprefix("file://")


def test_build_records_member_offsets_that_tarfile_agrees_with(data, tmp_path):
    import tarfile
    store, shards, _ = copy_version(data, tmp_path / "ds")
    assert len(shards) > 2
    for shard in shards:
        index = pq.read_table(local(shard["index_url"])).to_pylist()
        with tarfile.open(local(shard["url"])) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar]
        assert [(f"{r['key']}.{m['ext']}", m["offset"], m["size"]) for r in index for m in r["members"]] == expected
        assert {"key", "source", "kind", "status", "bytes", "sha256"} <= set(index[0])   # old columns kept


def batches_of(ref, stage, n, **kw):
    loader = TrainingLoader([DataSource(ref)], stage, cfg_(batch_size=3, face_views=1, **kw))
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out, loader.heldout_batch(3, frames="seen")


def assert_same_batches(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["keys"] == y["keys"]
        for name, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[name]), name


@pytest.mark.parametrize("stage", ["pretrain", "mid", "post"])
def test_range_reads_serve_exactly_what_streaming_serves(data, stage):
    # 6 batches of 3 over 8 studio frames: more than an epoch, both workers, several shards
    ranged, held_r = batches_of(data["mixed"]["ref"], stage, 6)
    streamed, held_s = batches_of(data["mixed"]["ref"], stage, 6, range_reads=False)
    assert_same_batches(ranged + [held_r], streamed + [held_s])


def test_index_without_offsets_streams_the_tar(data, tmp_path):
    """An index written before the members column (older builds) still loads, the same samples."""
    store, shards, ref = copy_version(data, tmp_path / "ds")
    for shard in shards:
        path = local(shard["index_url"])
        pq.write_table(pq.read_table(path).drop_columns(["members"]), path)
        assert store.shard_members(shard) is None
    old, _ = batches_of(ref, "post", 4)
    new, _ = batches_of(data["mixed"]["ref"], "post", 4)
    assert_same_batches(old, new)


def tamper_index(shard, change):
    path = local(shard["index_url"])
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["members"] = [{**m, **change(m)} for m in r["members"]]
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), path)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "ends before byte .* the shard is truncated"),
    ("offset_beyond_end", "outside the .*-byte tar"),
    ("huge_size", "outside the .*-byte tar"),
    ("shifted", "the shard index does not match the tar"),
])
def test_damaged_shard_or_index_is_one_data_error_line(data, tmp_path, damage, message):
    store, shards, ref = copy_version(data, tmp_path / "ds")
    for shard in shards:
        if damage == "truncate":
            with open(local(shard["url"]), "r+b") as f:
                f.truncate(shard["bytes"] // 2)
        elif damage == "offset_beyond_end":
            tamper_index(shard, lambda m: {"offset": m["offset"] + shard["bytes"]})
        elif damage == "huge_size":
            tamper_index(shard, lambda m: {"size": 1 << 50})
        else:
            tamper_index(shard, lambda m: {"offset": m["offset"] + 512})
    start = time.time()
    with pytest.raises(DataError, match=message) as err:
        next(iter(TrainingLoader([DataSource(ref)], "post", cfg_(num_workers=0))))
    assert "\n" not in str(err.value) and time.time() - start < 30
