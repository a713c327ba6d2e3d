"""`pippo data build`: the Ray job that turns sources into a new dataset version.

    enumerate inputs (driver, listing only)
      → skip inputs the parent version already holds (incremental; same recipe only)
      → hash: a Ray Data flat_map reads the inputs that could be exact duplicates (tar samples,
        URLs, photos whose listed size another input shares) and takes their sha256
      → dedup (driver): exact duplicates within the build and against the parent are rejected
      → units: surviving inputs sorted by id, cut into units of `unit_inputs`; unit id =
        hash(recipe, input ids), so a re-run forms the same units with the same names
      → build: one Ray task per unit not yet marked done (see run_units): samples → shards
        (ShardWriter), then the unit marker (shards, ledger rows) written last
      → commit (driver): manifest, rejects, inputs ledger, stats, preview, then the version record.

Kill it anywhere and run it again: finished units are found by their markers and reused,
unfinished ones are redone under the same names, and the version lists exactly the samples of an
uninterrupted build. Counts always conserve: inputs = samples + rejected.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter

from dataprep.build_config import BuildConfig
from dataprep.capture import Capture
from dataprep.errors import DataError
from dataprep.photos import Rejected
from dataprep.samples import photo_sample, studio_sample
from dataprep.shards import ShardWriter
from dataprep.sources import (InputItem, check_body, enumerate_source, fetch, sha256, tar_rows, tar_samples,
                              wds_image)
from dataprep.storage import atomic_write_bytes, read_bytes
from dataprep.commit import commit_version
from dataprep.store import BuildLease, DatasetStore, VersionNotFound

log = logging.getLogger("pippo.data.build")

RETRY_STAGES = ("fetch", "error")   # passing failures: an incremental build tries these inputs again

def ensure_ray(dashboard: bool = False):
    """Local Ray in-process unless RAY_ADDRESS names a cluster (never attach to a stray one).
    `dashboard`: also start the dashboard, whose state API Ray Train's controller polls."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=dashboard,
                 logging_level=logging.WARNING, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False       # our own bar counts inputs, not Ray blocks
    ctx.print_on_execution_start = False
    return ray


# ---- phase A: read and hash --------------------------------------------------------------------

def _cached_fetch(uri: str, cfg: BuildConfig, store_uri: str, kind: str = "image") -> bytes:
    """fetch(), with http(s) downloads kept in the store's cache so re-runs never download twice.
    Only bodies that are what they should be (an allowed image format / a tar) are cached."""
    limit = cfg.inputs.max_tar_bytes if kind == "wds" else cfg.inputs.max_bytes
    if not uri.startswith(("http://", "https://")):
        return fetch(uri, cfg.http, limit)
    cache = DatasetStore(store_uri).url("cache", "urls", hashlib.sha1(uri.encode()).hexdigest())
    try:
        return read_bytes(cache)
    except FileNotFoundError:
        data = fetch(uri, cfg.http, limit)
        check_body(data, kind, cfg.filters.max_pixels)
        atomic_write_bytes(cache, data)
        return data


def _row_reject(item: InputItem, stage: str, reason: str) -> dict:
    return {**item.to_row(), "sha256": "", "stage": stage, "reason": reason}


def hash_inputs(row: dict, cfg: BuildConfig, store_uri: str) -> list[dict]:
    """One image or tar -> rows (input fields + sha256, or stage/reason of a reject)."""
    item = InputItem(**{k: row[k] for k in InputItem.__dataclass_fields__})
    try:
        data = _cached_fetch(item.uri, cfg, store_uri, item.kind)
        if item.kind == "image":
            if not data:
                raise Rejected("decode", "empty file (0 bytes)")   # not a "duplicate" of other empties
            return [{**item.to_row(), "size": len(data), "sha256": sha256(data), "stage": "", "reason": ""}]
        return tar_rows(item, data, cfg.inputs.max_bytes)
    except Rejected as r:
        return [_row_reject(item, r.stage, r.reason)]
    except Exception as exc:   # a bug must not lose the other inputs: record it, loudly
        log.exception("unexpected error on %s", item.input_id)
        return [_row_reject(item, "error", f"unexpected {type(exc).__name__}: {exc}")]


# ---- phase B: build one unit -------------------------------------------------------------------

def build_unit(row: dict, cfg: BuildConfig, store_uri: str, recipe: str) -> dict:
    """Turn a unit's inputs into shards; write the unit marker last; return the marker."""
    import cv2
    cv2.setNumThreads(1)    # a unit is a one-CPU task: no thread pool oversubscribing the node
    store = DatasetStore(store_uri)
    unit, items = row["unit"], json.loads(row["items"])
    start = time.time()
    writer = ShardWriter(store.shards_url(recipe), unit, cfg.shard)
    captures: dict[str, Capture | Rejected] = {}
    tars: dict[str, dict] = {}
    rejects, inputs, dropped_views = [], [], 0
    try:
        for it in items:
            item = InputItem(**{k: it[k] for k in InputItem.__dataclass_fields__})
            sha = it.get("sha256", "")
            try:
                if item.kind == "studio":
                    if item.uri not in captures:
                        try:
                            captures[item.uri] = Capture(item.uri, strict=False, max_pixels=cfg.filters.max_pixels,
                                                     inputs=cfg.inputs)
                        except DataError as exc:
                            captures[item.uri] = Rejected("capture", str(exc))
                    cap = captures[item.uri]
                    if isinstance(cap, Rejected):
                        raise cap
                    key, members, info = studio_sample(cap, item.frame, cfg, item.input_id)
                    dropped_views += len(info["dropped"])
                    kind = "studio"
                else:
                    if item.kind == "wds":
                        if item.uri not in tars:
                            tars.clear()     # inputs are sorted: one tar in memory at a time
                            tars[item.uri] = tar_samples(_cached_fetch(item.uri, cfg, store_uri, "wds"),
                                                         cfg.inputs.max_bytes)
                        data = wds_image(tars[item.uri][item.member])
                    else:
                        data = _cached_fetch(item.uri, cfg, store_uri)
                    digest = sha256(data)
                    if sha and digest != sha:
                        raise Rejected("fetch", "source changed during the build (sha256 differs)")
                    sha = digest
                    key, members = photo_sample(data, cfg, item.input_id, sha)
                    kind = "image"
                writer.add(key, members, item.input_id, kind, sha)
                inputs.append({"input": item.input_id, "status": "kept", "key": key, "sha256": sha,
                               "kind": item.kind, "uri": item.uri, "stage": "", "size": item.size})
            except Exception as exc:
                if isinstance(exc, Rejected):
                    stage, reason = exc.stage, exc.reason
                else:   # a bug must not lose the other inputs: record it, loudly
                    log.exception("unexpected error on %s", item.input_id)
                    stage, reason = "error", f"unexpected {type(exc).__name__}: {exc}"
                rejects.append({"input": item.input_id, "stage": stage, "reason": reason})
                inputs.append({"input": item.input_id, "status": "rejected", "key": "", "sha256": sha,
                               "kind": item.kind, "uri": item.uri, "stage": stage, "size": item.size})
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    for cap in captures.values():
        if isinstance(cap, Capture):
            cap.close()
    marker = {"unit": unit, "recipe": recipe, "shards": shards, "rejects": rejects, "inputs": inputs,
              "dropped_views": dropped_views, "seconds": time.time() - start}
    store.write_json(store.unit_marker_path(recipe, unit), marker)
    return marker


# ---- the job -----------------------------------------------------------------------------------

def plan_units(items: list[dict], recipe: str, size: int) -> list[dict]:
    items = sorted(items, key=lambda r: r["input_id"])
    units = []
    for k in range(0, len(items), size):
        chunk = items[k:k + size]
        digest = hashlib.sha256("\n".join([recipe] + [r["input_id"] for r in chunk]).encode())
        units.append({"unit": digest.hexdigest()[:16], "items": json.dumps(chunk)})
    return units


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="unit", file=sys.stderr, disable=None)


def run_build(cfg: BuildConfig, config_dict: dict) -> str:
    """Run the build and commit the version; returns the version id."""
    started = time.time()
    store = DatasetStore(cfg.dataset)
    recipe = cfg.recipe_hash()
    parent = _parent(store, cfg)
    reuse = parent is not None and parent.get("recipe") == recipe
    if parent is not None and not reuse:
        log.info("parent %s was built with another recipe: building everything again", parent["id"])

    # Enumerate.
    items, ledger_rejects = [], []
    for source in cfg.sources:
        found, rejected = enumerate_source(source)
        log.info("source %s %s: %d inputs", source.kind, source.uri, len(found))
        items += [i.to_row() for i in found]
        ledger_rejects += rejected
    seen, unique = set(), []
    for row in items:
        if row["input_id"] in seen:
            ledger_rejects.append({**row, "stage": "source", "reason": "listed twice"})
        else:
            seen.add(row["input_id"])
            unique.append(row)
    parent_inputs = store.read_table(parent["inputs_url"]).to_pylist() if reuse else []
    # Inputs the parent rejected for a passing reason (download failure, unexpected error) are
    # tried again; everything else the parent saw is done.
    retry = {r["input"] for r in parent_inputs if r["status"] == "rejected" and r["stage"] in RETRY_STAGES}
    done = {r["input"] for r in parent_inputs} - retry
    done_tars = {r["uri"] for r in parent_inputs if r["kind"] == "wds" and r["input"] not in retry}
    new = [r for r in unique if r["input_id"] not in done
           and not (r["kind"] == "wds" and r["uri"] in done_tars)]
    ledger_rejects = [r for r in ledger_rejects if r["input_id"] not in done]
    log.info("%d inputs (%d new since parent %s, %d retried)", len(unique), len(new),
             parent["id"] if parent else "-", len(retry))

    # Phase A: read and hash the inputs that may be exact duplicates. Equal bytes have equal
    # sizes, so a photo whose listed size no other input (nor any parent sample) has cannot be a
    # duplicate and skips this pass: its unit hashes it. Tars and URLs (size unknown) are hashed.
    sizes = Counter(r["size"] for r in new if r["kind"] == "image" and r["size"] >= 0)
    parent_sizes = {r["size"] for r in parent_inputs if r["status"] == "kept"} if cfg.dedup_against_parent else set()
    if not cfg.dedup:
        sizes = Counter()

    def may_repeat(r: dict) -> bool:
        return r["size"] < 0 or sizes[r["size"]] > 1 or r["size"] in parent_sizes

    to_hash = [r for r in new if r["kind"] == "wds" or (r["kind"] == "image" and may_repeat(r))]
    unique_size = [{**r, "sha256": ""} for r in new if r["kind"] == "image" and not may_repeat(r)]
    hashed = []
    if to_hash:
        ray = ensure_ray()
        ds = ray.data.from_items(to_hash, override_num_blocks=min(len(to_hash), 4 * _cpus(ray)))
        ds = ds.flat_map(lambda row: hash_inputs(row, cfg, store.uri), concurrency=cfg.workers)
        hashed = ds.take_all()
    # Dedup within the build (smallest input id wins) and against the parent's samples.
    parent_sha = {r["sha256"]: r["input"] for r in parent_inputs if r["status"] == "kept" and r["sha256"]}
    survivors = [r for r in new if r["kind"] == "studio"] + unique_size
    first_of: dict[str, str] = {}
    for row in sorted(hashed, key=lambda r: r["input_id"]):
        if row["input_id"] in done:
            continue                                   # a member of a tar the parent already read
        if row["stage"]:
            ledger_rejects.append(row)
        elif cfg.dedup_against_parent and row["sha256"] in parent_sha:
            ledger_rejects.append({**row, "stage": "dedup",
                                   "reason": f"duplicate of {parent_sha[row['sha256']]} (parent)"})
        elif cfg.dedup and row["sha256"] in first_of:
            ledger_rejects.append({**row, "stage": "dedup", "reason": f"duplicate of {first_of[row['sha256']]}"})
        else:
            first_of.setdefault(row["sha256"], row["input_id"])
            survivors.append(row)

    # Phase B: build the units that are not done yet. A running build holds a lease, so gc
    # leaves its recipe's shards and its parent alone.
    with BuildLease(store, recipe, parent["id"] if parent else None):
        units = plan_units(survivors, recipe, cfg.unit_inputs)
        markers, todo = {}, []
        for u in units:
            marker = store.finished_unit(recipe, u["unit"])
            if marker is not None:
                markers[u["unit"]] = marker
            else:
                todo.append(u)
        log.info("%d units: %d done before (reused), %d to build", len(units), len(markers), len(todo))
        if todo:
            for marker in run_units(ensure_ray(), todo, cfg, store.uri, recipe):
                markers[marker["unit"]] = marker
        return commit_version(store, cfg, config_dict, parent, reuse, markers, ledger_rejects, started,
                              units_reused=len(units) - len(todo), drop_inputs=retry,
                              extra_stats={"inputs_prehashed": len(to_hash)})


def run_units(ray, todo: list[dict], cfg: BuildConfig, store_uri: str, recipe: str):
    """Build units as Ray tasks, at most `workers` (default: one per CPU) in flight; yields markers.

    Plain Ray tasks rather than a Ray Data map: a unit is a coarse, self-contained task that
    writes its own shards, and Ray Data schedules such one-row blocks with a large per-block
    overhead (ray-project/ray#65473) — measured here, 2 workers ran no faster than 1 through
    Ray Data and 1.9× faster as tasks (benches/build_throughput.py). Ray retries a unit whose
    worker died; units are idempotent, so a retry rewrites the same shards.
    """
    task = ray.remote(num_cpus=1, max_retries=3)(build_unit)
    cfg_ref = ray.put(cfg)
    window = cfg.workers or _cpus(ray)
    pending, queue = [], list(todo)
    with _progress(len(todo), "building units") as bar:
        while queue or pending:
            while queue and len(pending) < window:
                pending.append(task.remote(queue.pop(0), cfg_ref, store_uri, recipe))
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
                bar.update(1)


def _cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _parent(store: DatasetStore, cfg: BuildConfig) -> dict | None:
    if cfg.parent is None:
        return None
    try:
        return store.resolve(cfg.parent)
    except VersionNotFound:
        if cfg.parent != "latest":
            raise
        return None
