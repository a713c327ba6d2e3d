"""`pippo data build`: the Ray job that turns sources into a new dataset version.

    plan (driver): one `info` per source -> listing units (never a listing); the parent's parts list
      → list: a Ray task per unit lists its inputs and routes each to its partition (hash of the
        URL holding its bytes); tables stay in Ray's object store
      → process: a task per partition (dataprep/build/partition_job.py) skips what the parent decided,
        reads each new input once (sha256, filters, the sample) and sends sha claims to buckets
      → dedup: a task per sha bucket (the sha-keyed shuffle) picks one input per exact duplicate
        set, against the parent's sha index too
      → write: a task per partition writes its shards and ledger as a part (record last)
      → commit (driver): the parts list, stats, preview, then the version record.

The driver holds partition ids, object refs and per-part summaries only — never a row per input —
and an incremental build reads from the parent only its parts list (each partition job reads the
parent parts of its own partition). Kill it anywhere and run it again: finished parts are found by
their records and reused, unfinished ones are redone under the same names, and the version lists
exactly the samples of an uninterrupted build. Counts conserve: inputs = kept + rejected + removed.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict

import pyarrow as pa

from dataprep.build_config import BuildConfig
from dataprep.build.records import (CommitSettings, DedupRefs, PartitionPlan, PartitionTask, ProcessRefs,
                                    VersionPlan)
from dataprep.build.commit import commit_version
from dataprep.samples.detect_stage import start_detectors, stop_detectors
from pippo_common.errors import DataError
from dataprep.build.listing import list_unit, plan_listing
from dataprep.build.partition_job import dedup_bucket, process_partition, write_partition
from dataprep.store.core import BuildLease, DatasetStore, VersionNotFound
from pippo_common.ray_start import ensure_ray

log = logging.getLogger("pippo.data.build")


class Progress:
    """Progress as log lines (logs, CI and Ray job output) every `every_s`, and a tqdm bar when
    stderr is a terminal: items done, rate, ETA."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 10.0):
        from tqdm import tqdm
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done, self.started, self.last = 0, time.time(), 0.0
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr) if sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.time()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d %s, %.1f %s/s, ETA %s", self.what, self.done, self.total, self.unit,
                     rate, self.unit, _duration(eta))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _parent(store: DatasetStore, cfg: BuildConfig, recipe: str) -> dict | None:
    if cfg.parent is None:
        return None
    try:
        # `latest` = the newest version of this recipe: another recipe's samples are not reusable
        return store.resolve(cfg.parent, recipe=recipe if cfg.parent == "latest" else None)
    except VersionNotFound:
        if cfg.parent != "latest":
            raise
        return None


def run_build(cfg: BuildConfig, config_dict: dict, dry_run: bool = False) -> str | dict:
    """Run the build and commit the version; returns the version id (a plan summary if dry_run)."""
    started = time.time()
    store = DatasetStore(cfg.dataset)
    recipe = cfg.recipe_hash()
    if not dry_run:
        store.claim_root()
    # the lease is taken before the parent is resolved: a gc starting now sees this build and
    # spares its recipe's files and (once named) its parent
    with BuildLease(store, recipe, None, register=not dry_run) as lease:
        parent = _parent(store, cfg, recipe)
        if parent is not None and parent.get("recipe") != recipe:
            log.info("parent %s was built with another recipe: building everything again", parent["id"])
            parent = None
        lease.set_parent(parent["id"] if parent else None)
        partitions = parent["partitions"] if parent else cfg.partitions
        # the sha shuffle moves partitions x buckets objects: a bucket count bounded apart from
        # the partitions keeps the driver's refs ~2 x 256 x partitions (also a lineage property)
        buckets = parent.get("sha_buckets", partitions) if parent else min(partitions, MAX_SHA_BUCKETS)
        if parent and partitions != cfg.partitions:
            log.info("keeping the parent's %d partitions (config: %d)", partitions, cfg.partitions)
        parent_parts = store.version_parts(parent) if parent else []
        units, signatures, skipped = plan_listing(cfg.sources, parent.get("listings", {}) if parent else {},
                                                  splits=min(partitions, MAX_DIRECTORY_SPLITS))
        log.debug("%d listing units (%d unchanged list files skipped), %d partitions, parent %s",
                 len(units), len(skipped), partitions, parent["id"] if parent else "-")
        ray = ensure_ray()
        # at most MAX_LISTING_TASKS tasks, each listing several units: the driver holds
        # tasks x partitions refs, bounded whatever the number of list files or directories
        groups = [units[k::MAX_LISTING_TASKS] for k in range(min(len(units), MAX_LISTING_TASKS))]
        lister = ray.remote(num_cpus=1, num_returns=partitions + 1, max_retries=3)(_list_units)
        listed = [lister.remote(g, partitions, cfg.inputs) for g in groups]
        listing = [s for summaries in ray.get([refs[-1] for refs in listed]) for s in summaries]
        total = sum(s["rows"] for s in listing)
        _check_sources(cfg, [u for g in groups for u in g], listing)
        log.info("listed %d inputs (%d list files unchanged since parent %s, not read)", total, len(skipped),
                 parent["id"] if parent else "-")
        relisted = sorted({u.listing for u in units})

        def parts_of(p: int, kind: str) -> list[dict]:
            return [r for r in parent_parts if r["partition"] == p and r["kind"] == kind]

        # the detection stage: actors holding the model, fed in batches by the process tasks
        detectors = start_detectors(ray, cfg) if cfg.needs_detection() and not dry_run else []
        try:
            process = ray.remote(num_cpus=1, num_returns=buckets + 2, max_retries=3)(_process)
            processed = [ProcessRefs.of(process.remote(
                PartitionTask(p, partitions, buckets, store.uri, recipe, parts_of(p, "ledger"), relisted, dry_run),
                cfg, *[refs[p] for refs in listed], detectors=detectors)) for p in range(partitions)]
            summaries = _drain(ray, [r.summary for r in processed], Progress("process", total, "inputs"),
                               lambda s: s["listed"])
        finally:
            stop_detectors(ray, detectors)
        unknown = sorted({c for s in summaries for c in s["unknown_cameras"]})
        if unknown:   # a typo in `cameras:` must not pass as "those views were dropped"
            log.warning("cameras %s of the config are in none of the captures read", ", ".join(unknown[:10]))
        if dry_run:
            return _plan_summary(summaries, total, len(units), len(skipped), partitions, parent, started)
        dedup = ray.remote(num_cpus=1, num_returns=partitions + 1, max_retries=3)(dedup_bucket)
        deduped = [DedupRefs.of(dedup.remote(b, partitions, cfg, store.uri, recipe, parts_of(b, "sha"),
                                             *[r.claims[b] for r in processed])) for b in range(buckets)]
        write = ray.remote(num_cpus=1, max_retries=3)(write_partition)
        written = [write.remote(processed[p].plan, cfg.shard, store.uri, recipe, *[d.losers[p] for d in deduped])
                   for p in range(partitions)]
        results = [r for r in _drain(ray, written, Progress("write", partitions, "partitions"),
                                      lambda r: 1) if r]
        sha_records = [r for r in ray.get([d.record for d in deduped]) if r]
        settings = CommitSettings(recipe, list(cfg.tags), cfg.preview_samples, config_dict or asdict(cfg))
        return commit_version(store, settings, VersionPlan(
            parent, parent_parts, results, sha_records,
            {**(parent.get("listings", {}) if parent else {}), **signatures}, partitions, started,
            sha_buckets=buckets, listed=sum(s["listed"] for s in summaries)))


MAX_LISTING_TASKS = 256
MAX_DIRECTORY_SPLITS = 16   # tasks listing one photo directory (each streams its top level once)
MAX_SHA_BUCKETS = 256


def _list_units(units, partitions, policy):
    """List several units: one table per partition (concatenated) and a summary per unit."""
    per_partition, summaries = [[] for _ in range(partitions)], []
    for unit in units:
        tables, summary = list_unit(unit, partitions, policy)
        for p, t in enumerate(tables):
            per_partition[p].append(t)
        summaries.append({**summary, "rows": sum(t.num_rows for t in tables)})
    return (*[pa.concat_tables(ts) for ts in per_partition], summaries)


def _check_sources(cfg: BuildConfig, units, summaries) -> None:
    """A source that yields no input to read is a config mistake, not an empty dataset: one line.
    (Checked per source over its listing units; a list file skipped as unchanged had inputs.)"""
    found: dict[int, list] = {}
    for unit, s in zip(units, summaries):
        found.setdefault(unit.source, []).append(s)
    for index, source in enumerate(cfg.sources):
        parts = found.get(index)
        if parts is None:
            continue          # not listed this time: an unchanged list file
        if not sum(s["items"] for s in parts):
            rejects = sum(s["rejects"] for s in parts)
            example = next((s["reject"] for s in parts if s["reject"]), "")
            detail = f"; {rejects} refused, e.g. {example}" if rejects else ""
            raise DataError(f"{source.kind} source {source.uri} yields no inputs to read{detail}")


def _process(task: PartitionTask, cfg: BuildConfig, *listing, detectors=None):
    """process_partition, with a small summary first (the driver fetches only that): the
    returns are read back by name through `ProcessRefs`."""
    out = process_partition(task, cfg, *listing, detectors=detectors)
    plan: PartitionPlan = out[0]
    summary = {"partition": task.partition, "listed": sum(t.num_rows for t in listing), "part": plan.part,
               "unknown_cameras": plan.unknown_cameras, "reused": plan.finished is not None,
               "new": plan.todo, "gone": len(plan.gone), "decided": len(plan.decided)}
    return (summary, *out)


def _drain(ray, refs: list, progress: Progress, size) -> list:
    """ray.get every ref as it finishes, reporting progress; results in submission order."""
    index = {r: i for i, r in enumerate(refs)}
    results, pending = [None] * len(refs), list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = value = ray.get(ref)
                progress.update(size(value))
    finally:
        progress.close()
    return results


def _plan_summary(summaries, total, units, skipped, partitions, parent, started) -> dict:
    busy = [s for s in summaries if s["part"]]
    return {"listed": total, "listing_units": units, "list_files_skipped": skipped,
            "partitions": partitions, "partitions_to_build": len(busy),
            "new_inputs": sum(s["new"] for s in busy), "gone_inputs": sum(s["gone"] for s in busy),
            "parent": parent["id"] if parent else None, "seconds": round(time.time() - started, 3)}
