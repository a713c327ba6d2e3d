"""Versions made from versions, without a build: takedowns (`pippo data remove`) and compaction
(`pippo data compact`). Both touch only the partitions concerned, on the driver (no Ray): their
work is O(affected parts), and each ends in a new version like a build does (record last)."""
from __future__ import annotations

import logging
import time

import pyarrow as pa

import dataprep.store.ledger as ledgers
from dataprep.build_config import ShardLimits
from dataprep.build.records import CommitSettings, PartitionPlan, PartitionResult, VersionPlan
from dataprep.build.commit import commit_version
from pippo_common.errors import DataError
from dataprep.store.ledger import SHA_SCHEMA, ledger_counts, part_id, write_part
from dataprep.build.listing import partition_of
from dataprep.build.partition_job import rewrite_jobs, write_partition
from dataprep.store.shards import ShardWriter
from dataprep.store.core import DatasetStore

log = logging.getLogger("pippo.data.maintenance")

MAX_LIST_BYTES = 1 << 30


def _settings(parent: dict, operation: dict) -> tuple[CommitSettings, ShardLimits]:
    """What a maintenance version commits with: the parent's recipe and config (plus the
    operation), and the parent's shard limits for the shards it writes."""
    config = parent.get("config") or {}
    limits = ShardLimits(**config.get("shard", {})) if config else ShardLimits()
    return CommitSettings(parent["recipe"], [], 8, {**config, "operation": operation}), limits


def _holder(input_id: str) -> str:
    """The URL holding an input's bytes (what partitions are keyed by): a tar member's tar, a
    frame's capture, else the input itself."""
    for sep in ("#frame=", "#"):
        if sep in input_id:
            return input_id.split(sep, 1)[0]
    return input_id


def remove_inputs(store: DatasetStore, ref: str, inputs_file: str) -> tuple[str, dict]:
    """A new version of `ref` without the listed inputs (one input id per line; a takedown):
    their ledger rows become `removed`, and each shard holding one is rewritten without it."""
    from pippo_common.storage import fs_and_path
    fs, path = fs_and_path(inputs_file)
    if not fs.isfile(path) or fs.info(path)["size"] > MAX_LIST_BYTES:
        raise DataError(f"{inputs_file}: not a regular file of at most {MAX_LIST_BYTES >> 20} MiB")
    with fs.open(path, "rb") as f:
        wanted = {ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()
                  if ln.strip() and not ln.startswith("#")}
    started = time.time()
    parent = store.resolve(ref)
    partitions, recipe = parent["partitions"], parent["recipe"]
    by_partition: dict[int, set[str]] = {}
    for name in wanted:
        by_partition.setdefault(partition_of(_holder(name), partitions), set()).add(name)
    settings, limits = _settings(parent, {"remove": sorted(wanted)[:1000], "inputs": len(wanted)})
    parent_parts = store.version_parts(parent)
    results, found = [], set()
    for p, names in sorted(by_partition.items()):
        parts = [r for r in parent_parts if r["partition"] == p and r["kind"] == "ledger"]
        records = store.part_records(parts)
        previous = ledgers.ledger_state(store, records)
        doomed = [previous[n] for n in sorted(names) if n in previous and previous[n]["status"] != "removed"]
        found.update(r["input"] for r in doomed)
        if not doomed:
            continue
        plan = PartitionPlan(partition=p, part=part_id(recipe, "remove", p, *(r["input"] for r in doomed),
                                                       *sorted(x["digest"] for x in parts)),
                             gone=doomed, gone_reason=("takedown", "removed on request"),
                             rewrites=rewrite_jobs(doomed, previous, records, {r["input"] for r in doomed}))
        results.append(write_partition(plan, limits, store.uri, recipe))
    missing = len(wanted) - len(found)
    if not results:
        raise DataError(f"none of the {len(wanted)} listed inputs is in {store.uri}@{parent['id']}")
    vid = commit_version(store, settings, VersionPlan(parent, parent_parts, results, [],
                                                      parent.get("listings", {}), partitions, started))
    return vid, {"removed": len(found), "not_found": missing, "partitions": len(results)}


def compact(store: DatasetStore, ref: str, min_fill: float = 0.5) -> tuple[str, dict]:
    """A new version of `ref` with the same samples in fewer parts and full shards: per partition,
    one ledger part (the replayed ledger) whose shards below `min_fill` of the shard limits are
    merged; one sha index part per bucket. Shards already full enough are listed as they are."""
    started = time.time()
    parent = store.resolve(ref)
    partitions, recipe = parent["partitions"], parent["recipe"]
    settings, limits = _settings(parent, {"compact": parent["id"]})
    parent_parts = store.version_parts(parent)
    results, sha_records, merged_shards = [], [], 0
    for p in range(partitions):
        for kind in ("ledger", "sha"):
            parts = [r for r in parent_parts if r["partition"] == p and r["kind"] == kind]
            if not parts:
                continue
            records = store.part_records(parts)
            name = part_id(recipe, "compact", kind, p, *(x["digest"] for x in parts))
            if kind == "sha":       # a bucket's sha index parts: concatenated into one
                rows = pa.concat_tables([store.read_table(r["ledger_url"]) for r in records]).to_pylist()
                sha_records.append(records[0] if len(records) == 1 else store.finished_part(recipe, name)
                                   or write_part(store, recipe, name, p, "sha", rows, schema=SHA_SCHEMA))
                continue
            rows = list(ledgers.ledger_state(store, records).values())
            dropped = {d for r in records for d in r.get("drops", [])}
            shards = [s for r in records for s in r["shards"] if s["url"] not in dropped]
            small = {s["url"] for s in shards
                     if s["samples"] < min_fill * limits.max_samples and s["bytes"] < min_fill * limits.max_bytes}
            if len(small) < 2 and len(parts) == 1:
                results.append(PartitionResult(records[0], reused=True))
                continue
            finished = store.finished_part(recipe, name)
            if finished is not None:
                results.append(PartitionResult(finished, reused=True))
                continue
            if len(small) < 2:
                small = set()
            keep = {r["key"]: r for r in rows if r["status"] == "kept" and r["shard"] in small}
            writers: dict[str, ShardWriter] = {}
            moved = {}
            try:
                for url in sorted(small):
                    for key, members in store.shard_samples(url):
                        row = keep.get(key)
                        if row is None:
                            continue
                        kind_ = "studio" if row["kind"] == "studio" else "image"
                        w = writers.setdefault(kind_, ShardWriter(store.shards_url(recipe), f"{name}-{kind_[0]}",
                                                                  limits, kind_))
                        w.add(key, members, row["input"], kind_, row["sha256"])
                        moved[row["input"]] = (kind_, len(w.shards))
                new = {k: w.close() for k, w in writers.items()}
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
            merged_shards += len(small)
            out = []
            for r in rows:
                if r["input"] in moved:
                    k, n = moved[r["input"]]
                    r = {**r, "shard": store.rel(new[k][n]["url"])}
                out.append(r)
            listed = [s for s in shards if s["url"] not in small]
            counts = ledger_counts(out, {})
            listed_abs = [{**s, "url": store.resolve_url(s["url"]), "index_url": store.resolve_url(s["index_url"])}
                          for s in listed]
            record = write_part(store, recipe, name, p, "ledger", out,
                                listed_abs + [s for k in sorted(new) for s in new[k]],
                                extra={"counts": dict(counts), "dropped_samples": 0, "dropped_bytes": 0})
            results.append(PartitionResult(record, reused=False))
    # the compacted parts are snapshots of their partitions: the version lists them alone, and
    # its totals are theirs (summed from zero), which the commit checks against the shards
    for r in results:
        if r.reused:   # a part listed as it was still counts in full
            rows = store.read_table(r.record["ledger_url"]).to_pylist()
            r.record = {**r.record, "counts": dict(ledger_counts(rows, {})), "dropped_samples": 0,
                        "dropped_bytes": 0}
    vid = commit_version(store, settings, VersionPlan(parent, [], results, sha_records, parent.get("listings", {}),
                                                      partitions, started, base=None, base_is_parent=False))
    return vid, {"merged_shards": merged_shards, "parts_before": len(parent_parts),
                 "parts_after": len(results) + len(sha_records)}
