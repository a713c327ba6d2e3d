"""Committing a build: the parts list, stats and preview, then the version record (last)."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from dataprep.build.records import CommitSettings, CommitTotals, VersionPlan
from dataprep.samples.preview import contact_sheet, overlay_anchor, png_bytes
from dataprep.store.ledger import PARTS_SCHEMA, part_row
from pippo_common.redact import redact_config
from pippo_common.versions import code_version
from dataprep.store.core import FORMAT, DatasetStore, _now, version_id

log = logging.getLogger("pippo.data.commit")


def commit_version(store: DatasetStore, settings: CommitSettings, plan: VersionPlan) -> str:
    """List `plan.parent_parts` plus the new parts as a version (record last). O(parts), never
    O(inputs): totals are those of the plan's base (default: the parent) plus each new part's."""
    results = plan.results
    base = plan.totals_base
    new_records = [r.record for r in results] + list(plan.sha_records)
    parts = list(plan.parent_parts) + [part_row(store, r) for r in sorted(new_records, key=lambda r: (r["kind"], r["partition"]))]
    totals = CommitTotals.of(base, results)
    totals.check()
    new_shards = totals.new_shards
    for s in new_shards:     # the parent's shards were checked by each partition job
        if not store.shard_intact(s):
            raise RuntimeError(f"shard {store.resolve_url(s['url'])} vanished before the commit; "
                               "run the same build again to rebuild it")
    vid = version_id([p["digest"] for p in parts])
    if store.fs.exists(store.path("versions", f"{vid}.json")):
        log.info("version %s already exists (same content): nothing to commit", vid)
        existing = store.resolve(vid)
        store.commit_version(existing)     # moves `latest` if a crash came between record and pointer
        _apply_tags(store, vid, settings.tags)
        return vid
    vdir = ("versions", vid)
    parts_url = store.url(*vdir, "parts.parquet")
    store.write_table(parts_url, pa.Table.from_pylist(parts, schema=PARTS_SCHEMA), exclusive=True)
    wall = time.time() - plan.started
    new_samples = sum(s["samples"] for s in new_shards)
    counts, samples = totals.counts, totals.samples
    stats = {"samples": samples, "bytes": totals.bytes,
             "samples_by_kind": {k: n for k, n in sorted(totals.kinds.items()) if n},
             "rejected": counts["rejected"], "removed": counts["removed"],
             "inputs": counts["inputs"], "rejected_by_reason": {k: v for k, v in sorted(totals.reasons.items()) if v},
             "parts": len(parts), "new_parts": len(new_records), "new_samples": new_samples,
             "new_shards": len(new_shards), "parts_reused": sum(bool(x.reused) for x in results),
             "dropped_views": totals.dropped_views,
             "wall_s": round(wall, 3), "samples_per_s": round(new_samples / wall, 3) if wall > 0 else None,
             "listed": plan.listed}
    stats["rejected_by_stage"] = dict(Counter({k.split(":")[0]: 0 for k in stats["rejected_by_reason"]}))
    for k, n in stats["rejected_by_reason"].items():
        stats["rejected_by_stage"][k.split(":")[0]] += n
    store.create_exclusive(store.path(*vdir, "stats.json"), json.dumps(stats, indent=1).encode())
    sheet = version_preview(store, new_shards, settings.preview_samples, f"{store.uri}@{vid}")
    store.create_exclusive(store.path(*vdir, "preview.png"), sheet)
    parent = plan.parent
    record = {"id": vid, "format": FORMAT, "parent": parent["id"] if parent else None, "created": _now(),
              "samples": samples, "rejected": counts["rejected"], "counts": dict(counts),
              "shards_total": (base or {}).get("shards_total", 0) + len(new_shards)
              - sum(len(x.record.get("drops", [])) for x in results),
              "parts_url": store.rel(parts_url), "stats_url": store.rel(store.url(*vdir, "stats.json")),
              "preview_url": store.rel(store.url(*vdir, "preview.png")), "partitions": plan.partitions,
              "sha_buckets": plan.sha_buckets or (parent or {}).get("sha_buckets") or plan.partitions,
              "listings": plan.listings, "stats": stats, "recipe": settings.recipe,
              # the config as written: expanded ${VAR}s (tokens) back to ${VAR}, URL credentials masked
              "config": redact_config(settings.config), "code_version": code_version()}
    if store.commit_version(record):
        log.info("committed version %s: %d samples, %d rejected, %d removed, %d new parts", vid, samples,
                 counts["rejected"], counts["removed"], len(new_records))
    _apply_tags(store, vid, settings.tags)
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
