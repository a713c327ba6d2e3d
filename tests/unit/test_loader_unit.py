"""The training-data loader on real versions built by run_build from tiny synthetic data:
exact epochs over ranks and workers, sample-exact resume (same and other world size),
determinism, the per-stage batch contract, filtering, mixing, holdout and s3 reading."""
import json

import pytest

from dataprep.build_config import PhotoFilters, ShardLimits
from dataprep.loader import held_out
from dataprep.store import DatasetStore
from dataprep.synth import synth_capture, synth_images
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


def test_holdout_set_never_empty_nor_everything():
    """A small version with a small fraction still holds out one sample (the eval step needs one)
    and a large fraction still trains on one; otherwise it is exactly the key-hash rule."""
    from dataprep.loader import holdout_set
    keys = [f"k{i}" for i in range(8)]
    tiny, huge = holdout_set(keys, 1e-9), holdout_set(keys, 0.999999)
    from dataprep.loader import _key_hash
    assert tiny == {min(keys, key=_key_hash)} and set(keys) - huge == {max(keys, key=_key_hash)}
    assert holdout_set(keys, 0.5) == {k for k in keys if held_out(k, 0.5)} or \
        not 0 < sum(held_out(k, 0.5) for k in keys) < 8
    assert holdout_set(keys, 0.0) == set() and holdout_set(["only"], 0.5) <= {"only"}
