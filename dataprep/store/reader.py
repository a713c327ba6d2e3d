"""`read_version(URI@REF) -> ray.data.Dataset`: a whole dataset version in Ray Data, one row per
sample, with one schema for every sample kind.

Why not `ray.data.read_webdataset(urls)` with its defaults: each shard holds one sample kind, so
each shard reads, but Ray merges the rows of several shards into one block, and a photo (`jpg`,
`json`) and a studio frame (`view00.jpg` ..., `plucker.npy`, `anchor.npy`, `json`) have different
members. The merged block has NaN in the other kind's columns, and Ray cannot cast a column of
decoded images with NaN holes to its tensor type (`Tried to cast column jpg to the TensorArray
tensor extension type`). So this reader still uses the stock `read_webdataset`, with a decoder
that maps every kind to the same columns (no holes, no nulls):

    __key__, __url__   the sample key and its shard
    kind               "studio" | "image" (from the sample's JSON)
    json               the sample's JSON document (SPEC §5) as text
    images             encoded view images (JPEG/PNG bytes) in view order; a photo has one
    plucker, anchor    `.npy` bytes of a studio sample (b"" for a photo, or when the anchors
                       are stored as per-view PNGs)

Decode as needed, naming the formats we mean, e.g.
`np.asarray(PIL.Image.open(io.BytesIO(row["images"][0]), formats=["PNG", "JPEG", "WEBP", "AVIF"]))`
and `np.load(io.BytesIO(row["plucker"]), allow_pickle=False)`. Object-store shards are read through the store's own
fsspec filesystem (its endpoint and credentials), wrapped for Arrow.
"""
from __future__ import annotations

import json
import re

VIEW_IMAGE = re.compile(r"view(\d+)\.(?:jpg|png)")


def sample_row(sample: dict) -> dict:
    """One webdataset sample ({"__key__", "__url__", member suffix: bytes}) -> the fixed row."""
    meta = json.loads(sample["json"])
    views = sorted((int(m.group(1)), k) for k in sample if (m := VIEW_IMAGE.fullmatch(k)))
    if views:
        images = tuple(sample[k] for _, k in views)
    else:
        images = tuple(sample[k] for k in ("jpg", "png") if k in sample)[:1]
    # a tuple, not a list: Ray's webdataset reader unwraps one-element lists (a photo's images)
    return {"__key__": sample["__key__"], "__url__": sample.get("__url__", ""),
            "kind": str(meta.get("kind", "")) if isinstance(meta, dict) else "",
            "json": sample["json"].decode("utf-8"), "images": images,
            "plucker": sample.get("plucker.npy", b""), "anchor": sample.get("anchor.npy", b"")}


def read_version(ref: str, **read_args):
    """Every sample of the version `ref` (URI@REF: id, unique prefix, tag or latest) as a Ray
    Dataset with the columns above. `read_args` go to `ray.data.read_webdataset`."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pippo_common.storage import fs_and_path, is_local
    from dataprep.store.core import DatasetStore, split_ref

    uri, name = split_ref(ref)
    store = DatasetStore(uri)
    shards = store.describe(store.resolve(name))["shards"]
    paths = [fs_and_path(s["url"])[1] for s in shards]
    if not paths:
        return ray.data.from_items([])
    if not is_local(store.fs):
        read_args.setdefault("filesystem", PyFileSystem(FSSpecHandler(store.fs)))
    return ray.data.read_webdataset(paths, decoder=sample_row, **read_args)
