"""Committing a build: ledgers, manifest, stats and preview, then the version record (last)."""
from __future__ import annotations

import json
import logging
import tarfile
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from dataprep.build_config import BuildConfig
from dataprep.preview import contact_sheet, overlay_anchor, png_bytes
from dataprep.storage import fs_and_path
from dataprep.store import DatasetStore, _now, table_digest, version_id

log = logging.getLogger("pippo.data.commit")

MANIFEST_SCHEMA = pa.schema([("url", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()),
                             ("sha256", pa.string()), ("index_url", pa.string())])
REJECT_SCHEMA = pa.schema([("input", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
# One row per input ever seen by the version's lineage: how incremental builds know what is done.
# uri = where the bytes live (the tar of a WebDataset member, the capture of a frame).
INPUT_SCHEMA = pa.schema([("input", pa.string()), ("status", pa.string()), ("key", pa.string()),
                          ("sha256", pa.string()), ("kind", pa.string()), ("uri", pa.string()),
                          ("stage", pa.string()), ("size", pa.int64())])


class ConservationError(RuntimeError):
    """inputs != samples + rejected: a bug, never committed."""


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"pippo-pipeline {version('pippo-pipeline')}"
    except PackageNotFoundError:
        return "pippo-pipeline (not installed)"


def commit_version(store: DatasetStore, cfg: BuildConfig, config_dict: dict, parent: dict | None,
                   reuse: bool, markers: dict, ledger_rejects: list[dict], started: float,
                   units_reused: int = 0, drop_inputs: set[str] = frozenset(),
                   extra_stats: dict | None = None) -> str:
    """Write the version of `markers` (+ the parent's samples when `reuse`) and list it, last."""
    base = parent if reuse else None
    shards = list(base["shards"]) if base else []
    rejects = [r for r in store.read_table(base["rejects_url"]).to_pylist() if r["input"] not in drop_inputs] if base else []
    inputs = [r for r in store.read_table(base["inputs_url"]).to_pylist() if r["input"] not in drop_inputs] if base else []
    for r in ledger_rejects:
        rejects.append({"input": r["input_id"], "stage": r["stage"], "reason": r["reason"]})
        inputs.append({"input": r["input_id"], "status": "rejected", "key": "", "sha256": r.get("sha256", ""),
                       "kind": r["kind"], "uri": r["uri"], "stage": r["stage"], "size": r.get("size", -1)})
    new_shards, dropped_views = [], 0
    for unit in sorted(markers):
        m = markers[unit]
        new_shards += m["shards"]
        rejects += m["rejects"]
        inputs += m["inputs"]
        dropped_views += m.get("dropped_views", 0)
    shards += new_shards
    samples = sum(s["samples"] for s in shards)
    kept = sum(r["status"] == "kept" for r in inputs)
    if kept != samples or len(inputs) != samples + len(rejects):
        raise ConservationError(f"inputs {len(inputs)} != samples {samples} + rejected {len(rejects)}")
    missing = [s["url"] for s in new_shards if not store.shard_intact(s)]
    if missing:   # e.g. deleted by a gc that ignored this build's lease: re-running rebuilds them
        for unit, m in markers.items():
            if any(s["url"] in missing for s in m["shards"]):
                store.fs.rm(store.unit_marker_path(cfg.recipe_hash(), unit))
        raise RuntimeError(f"{len(missing)} shards vanished before the commit (first: {missing[0]}); "
                           "run the same build again to rebuild them")
    rejects_t = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
    inputs_t = pa.Table.from_pylist(inputs, schema=INPUT_SCHEMA)
    vid = version_id(shards, table_digest(rejects_t), table_digest(inputs_t))
    if store.fs.exists(store.path("versions", f"{vid}.json")):
        log.info("version %s already exists (same content): nothing to commit", vid)
        _apply_tags(store, vid, cfg.tags)
        return vid

    vdir = ("versions", vid)
    manifest_url, rejects_url = store.url(*vdir, "manifest.parquet"), store.url(*vdir, "rejects.parquet")
    inputs_url, stats_url = store.url(*vdir, "inputs.parquet"), store.url(*vdir, "stats.json")
    preview_url = store.url(*vdir, "preview.png")
    # Version files are written only if absent: a concurrent build committing the same content
    # (same id) must not rewrite files of a version that may already be listed.
    store.write_table(manifest_url, pa.Table.from_pylist(shards, schema=MANIFEST_SCHEMA), exclusive=True)
    store.write_table(rejects_url, rejects_t, exclusive=True)
    store.write_table(inputs_url, inputs_t, exclusive=True)
    wall = time.time() - started
    new_samples = sum(s["samples"] for s in new_shards)
    stats = {"samples": samples, "rejected": len(rejects), "inputs": len(inputs),
             "samples_by_kind": dict(Counter(r["kind"] for r in inputs if r["status"] == "kept")),
             "rejected_by_stage": dict(Counter(r["stage"] for r in rejects)),
             "rejected_by_reason": dict(Counter(f"{r['stage']}: {_reason_class(r['reason'])}" for r in rejects)),
             "bytes": sum(s["bytes"] for s in shards), "shards": len(shards),
             "new_samples": new_samples, "new_shards": len(new_shards), "units_built": len(markers) - units_reused,
             "units_reused": units_reused, "dropped_views": dropped_views,
             "wall_s": round(wall, 3), "samples_per_s": round(new_samples / wall, 3) if wall > 0 else None,
             **(extra_stats or {})}
    store.create_exclusive(store.path(*vdir, "stats.json"), json.dumps(stats, indent=1).encode())
    sheet = version_preview(new_shards or shards, cfg.preview_samples, f"{store.uri}@{vid}")
    store.create_exclusive(store.path(*vdir, "preview.png"), sheet)
    record = {"id": vid, "parent": parent["id"] if parent else None, "created": _now(),
              "samples": samples, "rejected": len(rejects), "shards": [
                  {k: s[k] for k in ("url", "samples", "bytes", "sha256")} for s in shards],
              "rejects_url": rejects_url, "preview_url": preview_url,
              "manifest_url": manifest_url, "inputs_url": inputs_url, "stats_url": stats_url,
              "stats": stats, "recipe": cfg.recipe_hash(), "config": config_dict or asdict(cfg),
              "code_version": code_version()}
    if store.commit_version(record):
        log.info("committed version %s: %d samples, %d rejected, %d shards", vid, samples, len(rejects), len(shards))
    _apply_tags(store, vid, cfg.tags)
    return vid


def _apply_tags(store: DatasetStore, vid: str, tags: list[str]) -> None:
    for tag in tags:
        store.tag(vid, tag)


def _reason_class(reason: str) -> str:
    """Group reasons for stats: the text before the first detail in parentheses or after a colon."""
    return reason.split(" (")[0].split(": ")[0][:60]


def _stream_samples(url: str):
    """Samples of a shard in order, read as a stream (a shard may be ~1 GB): key -> {ext: bytes}."""
    fs, path = fs_and_path(url)
    key, sample = None, {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            k, _, ext = member.name.partition(".")
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def _decode(data: bytes) -> np.ndarray:
    import cv2
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def version_preview(shards: list[dict], max_samples: int, title: str) -> bytes:
    """Contact sheet of the first samples of the given shards (studio views with anchors)."""
    tiles, captions, count = [], [], 0
    for shard in shards:
        for key, sample in _stream_samples(shard["url"]):
            meta = json.loads(sample["json"])
            if meta["kind"] == "studio":
                for v in range(min(4, len(meta["views"]))):
                    view = sample.get(f"view{v:02d}.jpg") or sample[f"view{v:02d}.png"]
                    anchor = _decode(sample[f"view{v:02d}.anchor.png"]).transpose(2, 0, 1)
                    tiles.append(overlay_anchor(_decode(view), anchor))
                    captions.append(f"{meta['capture'][-16:]} f{meta['frame']} v{v}")
            else:
                tiles.append(_decode(sample.get("jpg") or sample["png"]))
                captions.append(f"photo {meta['orig_width']}x{meta['orig_height']}")
            count += 1
            if count >= max_samples:
                break
        if count >= max_samples:
            break
    if not tiles:
        tiles, captions = [np.zeros((160, 160, 3), np.uint8)], ["no samples"]
    return png_bytes(contact_sheet(tiles, captions, tile_height=160, title=title[-90:]))
