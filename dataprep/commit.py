"""Committing a build: the parts list, stats and preview, then the version record (last)."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from dataprep.build_config import BuildConfig
from dataprep.preview import contact_sheet, overlay_anchor, png_bytes
from dataprep.ledger import PARTS_SCHEMA, part_row
from pippo_common.redact import redact_config
from pippo_common.versions import code_version
from dataprep.store import FORMAT, DatasetStore, _now, version_id

log = logging.getLogger("pippo.data.commit")


class ConservationError(RuntimeError):
    """inputs != kept + rejected + removed, or kept != samples in shards: a bug, never committed."""


COUNT_KEYS = ("inputs", "kept", "rejected", "removed")


def commit_version(store: DatasetStore, cfg: BuildConfig, config_dict: dict, parent: dict | None,
                   parent_parts: list[dict], results: list[dict], sha_records: list[dict],
                   listings: dict, partitions: int, started: float, summaries: list[dict] = (),
                   base: dict | None | bool = True, sha_buckets: int | None = None) -> str:
    """List `parent_parts` plus the new parts as a version (record last). O(parts), never
    O(inputs): totals are those of `base` (default: the parent) plus each new part's deltas."""
    base = parent if base is True else base
    new_records = [r["record"] for r in results] + list(sha_records)
    parts = list(parent_parts) + [part_row(store, r) for r in sorted(new_records, key=lambda r: (r["kind"], r["partition"]))]
    totals = Counter({k: (base or {}).get("counts", {}).get(k, 0) for k in COUNT_KEYS})
    reasons = Counter((base or {}).get("stats", {}).get("rejected_by_reason", {}))
    samples = (base or {}).get("samples", 0)
    nbytes = (base or {}).get("stats", {}).get("bytes", 0)
    new_shards, dropped_views = [], 0
    for r in (x["record"] for x in results):
        for key, n in r["counts"].items():
            if key.startswith("reason|"):
                reasons[key[len("reason|"):]] += n
            elif key in COUNT_KEYS:
                totals[key] += n
        dropped_views += r["counts"].get("dropped_views", 0)
        samples += sum(s["samples"] for s in r["shards"]) - r.get("dropped_samples", 0)
        nbytes += sum(s["bytes"] for s in r["shards"]) - r.get("dropped_bytes", 0)
        new_shards += r["shards"]
    if totals["kept"] != samples or totals["inputs"] != totals["kept"] + totals["rejected"] + totals["removed"]:
        raise ConservationError(f"inputs {totals['inputs']} != kept {totals['kept']} + rejected "
                                f"{totals['rejected']} + removed {totals['removed']} (samples {samples})")
    for s in new_shards:     # the parent's shards were checked by each partition job
        if not store.shard_intact(s):
            raise RuntimeError(f"shard {store.resolve_url(s['url'])} vanished before the commit; "
                               "run the same build again to rebuild it")
    vid = version_id([p["digest"] for p in parts])
    if store.fs.exists(store.path("versions", f"{vid}.json")):
        log.info("version %s already exists (same content): nothing to commit", vid)
        existing = store.resolve(vid)
        store.commit_version(existing)     # moves `latest` if a crash came between record and pointer
        _apply_tags(store, vid, cfg.tags)
        return vid
    vdir = ("versions", vid)
    parts_url = store.url(*vdir, "parts.parquet")
    store.write_table(parts_url, pa.Table.from_pylist(parts, schema=PARTS_SCHEMA), exclusive=True)
    wall = time.time() - started
    new_samples = sum(s["samples"] for s in new_shards)
    kinds = Counter((base or {}).get("stats", {}).get("samples_by_kind", {}))
    for r in (x["record"] for x in results):
        kinds.update({k[len("kind|"):]: n for k, n in r["counts"].items() if k.startswith("kind|")})
    stats = {"samples": samples, "bytes": nbytes, "samples_by_kind": {k: n for k, n in sorted(kinds.items()) if n},
             "rejected": totals["rejected"], "removed": totals["removed"],
             "inputs": totals["inputs"], "rejected_by_reason": {k: v for k, v in sorted(reasons.items()) if v},
             "parts": len(parts), "new_parts": len(new_records), "new_samples": new_samples,
             "new_shards": len(new_shards), "parts_reused": sum(bool(x.get("reused")) for x in results),
             "dropped_views": dropped_views + (base or {}).get("stats", {}).get("dropped_views", 0),
             "wall_s": round(wall, 3), "samples_per_s": round(new_samples / wall, 3) if wall > 0 else None,
             "listed": sum(s["listed"] for s in summaries)}
    stats["rejected_by_stage"] = dict(Counter({k.split(":")[0]: 0 for k in stats["rejected_by_reason"]}))
    for k, n in stats["rejected_by_reason"].items():
        stats["rejected_by_stage"][k.split(":")[0]] += n
    store.create_exclusive(store.path(*vdir, "stats.json"), json.dumps(stats, indent=1).encode())
    sheet = version_preview(store, new_shards, cfg.preview_samples,
                            f"{store.uri}@{vid}")
    store.create_exclusive(store.path(*vdir, "preview.png"), sheet)
    record = {"id": vid, "format": FORMAT, "parent": parent["id"] if parent else None, "created": _now(),
              "samples": samples, "rejected": totals["rejected"], "counts": dict(totals),
              "shards_total": (base or {}).get("shards_total", 0) + len(new_shards)
              - sum(len(x["record"].get("drops", [])) for x in results),
              "parts_url": store.rel(parts_url), "stats_url": store.rel(store.url(*vdir, "stats.json")),
              "preview_url": store.rel(store.url(*vdir, "preview.png")), "partitions": partitions,
              "sha_buckets": sha_buckets or (parent or {}).get("sha_buckets") or partitions,
              "listings": listings, "stats": stats, "recipe": cfg.recipe_hash(),
              # the config as written: expanded ${VAR}s (tokens) back to ${VAR}, URL credentials masked
              "config": redact_config(config_dict or asdict(cfg)), "code_version": code_version()}
    if store.commit_version(record):
        log.info("committed version %s: %d samples, %d rejected, %d removed, %d new parts", vid, samples,
                 totals["rejected"], totals["removed"], len(new_records))
    _apply_tags(store, vid, cfg.tags)
    return vid


def _apply_tags(store: DatasetStore, vid: str, tags: list[str]) -> None:
    for tag in tags:
        store.tag(vid, tag)


def _decode(data: bytes) -> np.ndarray:
    import cv2
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def version_preview(store: DatasetStore, shards: list[dict], max_samples: int, title: str) -> bytes:
    """Contact sheet of the first samples of the given shards (studio views with anchors)."""
    tiles, captions, count = [], [], 0
    for shard in shards:
        for key, sample in store.shard_samples(shard["url"]):
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
