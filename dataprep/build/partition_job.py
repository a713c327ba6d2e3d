"""The three Ray stages of a build, per partition (see dataprep/build/job.py for the whole job).

    process(p)  reads partition p's listing and its parent parts, decides what is new, retried or
                gone, reads each new input ONCE (sha256, filters, the sample itself) and sends a
                (sha256, input) claim per processed photo to the sha bucket that owns its hash
    dedup(b)    the sha-keyed shuffle's reduce side: bucket b sees every claim on its hashes plus
                the parent's sha index of bucket b; the smallest input id wins, the rest (and any
                hash the parent holds) lose; it writes its slice of the sha index as a part
    write(p)    writes p's winners into shards (one sample kind per shard), rewrites parent shards
                that lost a removed sample, then the ledger part and its record (last)

Processed samples travel from process to write through Ray's object store (spilled to disk when
large), so an input is read once and its bytes never pass through the driver; a duplicate is
dropped before anything is written, so nothing is rewritten for dedup. Every stage is
deterministic and every name content-derived: a killed build re-run finds its finished parts
(the part record is written last) and redoes the rest under the same names.
"""
from __future__ import annotations

import hashlib
import logging
import time

import pyarrow as pa

import dataprep.store.ledger as ledgers
from dataprep.build_config import BuildConfig, ShardLimits
from dataprep.build.records import PartitionPlan, PartitionResult, PartitionTask
from dataprep.studio.capture import Capture
from pippo_common.errors import DataError
from dataprep.store.ledger import SHA_SCHEMA, ledger_counts, ledger_row, part_id, write_part
from dataprep.inputs.photos import Rejected
from pippo_common.redact import redact_text, strip_credentials
from dataprep.samples.detect_stage import DetectionBatcher
from dataprep.samples.make import finish_photo_sample, photo_sample, prepare_photo, studio_sample
from dataprep.store.shards import ShardWriter
from dataprep.inputs.sources import check_body, fetch, list_entry_at, read_tar, sha256, wds_image
from pippo_common.storage import atomic_write_bytes, read_bytes
from dataprep.store.core import DatasetStore

log = logging.getLogger("pippo.data.build")

RETRY_STAGES = ("fetch", "error")   # passing failures: a later build tries these inputs again
CLAIM_SCHEMA = pa.schema([("sha256", pa.string()), ("input", pa.string()), ("partition", pa.int32())])
LOSER_SCHEMA = pa.schema([("input", pa.string()), ("reason", pa.string())])


def cached_fetch(uri: str, cfg: BuildConfig, store_uri: str, kind: str = "image") -> bytes:
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


def sha_bucket(sha: str, partitions: int) -> int:
    return int(sha[:12], 16) % partitions


# ---- stage 1: process ---------------------------------------------------------------------------

def _check_shards(store: DatasetStore, records: list[dict]) -> None:
    """Every parent shard the new version will list again must still be there: a shard deleted
    (by hand, or by a gc that could not see this build) fails the build before it commits."""
    dropped = {d for r in records for d in r.get("drops", [])}
    for r in records:
        for s in r["shards"]:
            if s["url"] not in dropped and not store.shard_intact(s):
                raise DataError(f"the parent version lost shard {store.resolve_url(s['url'])} (deleted or "
                                "truncated): build with parent=null, or from another version")


def process_partition(task: PartitionTask, cfg: BuildConfig, *listing: pa.Table,
                      detectors: list | None = None) -> tuple:
    """-> (PartitionPlan, claims for sha bucket 0, ..., claims for bucket B-1). `task.dry_run`:
    plan only. `detectors`: the detection stage's actors (dataprep.samples.detect_stage; None:
    detection runs in this task)."""
    p, partitions, buckets, recipe = task.partition, task.partitions, task.buckets, task.recipe
    store_uri, parent_parts, dry_run = task.store_uri, task.parent_parts, task.dry_run
    import cv2
    cv2.setNumThreads(1)    # a partition job is a one-CPU task: no thread pool oversubscribing the node
    started = time.time()
    store = DatasetStore(store_uri)
    parent_records = store.part_records(parent_parts)
    if not dry_run:
        _check_shards(store, parent_records)
    previous = ledgers.ledger_state(store, parent_records)
    relisted = set(task.relisted)
    done_tars = {r["uri"] for r in previous.values()
                 if r["kind"] == "wds" and not (r["status"] == "rejected" and r["stage"] in RETRY_STAGES)}
    rows = pa.concat_tables(listing).to_pylist() if listing else []

    decided: list[dict] = []          # ledger rows decided here (rejects, removals)
    todo: list[dict] = []             # inputs to read
    seen: set[str] = set()
    refused_here: set[str] = set()    # inputs whose first listing was refused at the source
    replaced: list[dict] = []         # ledger rows of kept photos changed in place since
    listed_tars: set[str] = set()
    for r in sorted(rows, key=lambda r: (r["input_id"], r["stage"])):
        if r["kind"] == "wds":
            listed_tars.add(strip_credentials(r["uri"]))
        old = previous.get(r["input_id"])
        if r["input_id"] in seen:
            # a second listing of an input refused at the source adds no row: replay keeps the
            # last row of an input, and the first reason (why it cannot be read) is the useful one
            if old is None and r["input_id"] not in refused_here:
                decided.append(ledger_row(input=r["input_id"], status="rejected", kind=r["kind"], uri=r["uri"],
                                          listing=r["listing"], stage="source", reason="listed twice"))
            continue
        seen.add(r["input_id"])
        if r["stage"]:                                 # broken at the source level
            refused_here.add(r["input_id"])
            if old is None or (old["status"], old["stage"], old["reason"]) != ("rejected", r["stage"], r["reason"]):
                decided.append(ledger_row(input=r["input_id"], status="rejected", kind=r["kind"], uri=r["uri"],
                                          listing=r["listing"], stage=r["stage"], reason=r["reason"],
                                          size=r["size"], attempts=1, **_whence(r)))
            continue
        attempts = 1
        if old is not None and changed_in_place(old, r):
            if old["status"] == "kept":                # its old sample leaves its shard
                replaced.append(old)
        elif old is not None:
            retry = (old["status"] == "rejected" and old["stage"] in RETRY_STAGES
                     and old["attempts"] < cfg.max_attempts)
            back = old["status"] == "removed" and old["stage"] == "source"   # (a takedown stays removed)
            if not retry and not back:
                continue                               # decided by an earlier build
            attempts = old["attempts"] + 1 if retry else 1
        if r["kind"] == "wds" and strip_credentials(r["uri"]) in done_tars:
            continue                                   # a tar an earlier build read whole
        todo.append({**r, "attempts": attempts})

    # passing failures listed by a list file that was not read again (unchanged) are retried
    # from their ledger rows
    for name, old in sorted(previous.items()):
        if (name not in seen and old["listing"] not in relisted and old["status"] == "rejected"
                and old["stage"] in RETRY_STAGES and old["attempts"] < cfg.max_attempts
                and old["kind"] in ("image", "studio")):
            frame = int(name.rsplit("#frame=", 1)[1]) if old["kind"] == "studio" else -1
            todo.append({"input_id": name, "kind": old["kind"], "uri": _retry_uri(name, old, cfg), "frame": frame,
                         "member": "", "size": old["size"], "listing": old["listing"], "stage": "", "reason": "",
                         "attempts": old["attempts"] + 1, "tag": old.get("tag") or "",
                         "list_pos": _pos(old)})
            seen.add(name)

    # inputs gone from their source: their listing was read again and no longer has them. (A
    # source left out of the config is not read, so its inputs stay: a child build may name only
    # its new sources.)
    gone = []
    if cfg.on_missing == "remove":
        for name, old in sorted(previous.items()):
            if old["status"] != "removed" and name not in seen and old["uri"] not in listed_tars \
                    and old["listing"] in relisted:
                gone.append(old)
    part = part_id(recipe, p, partitions, *sorted(f"{t['input_id']}:{t['attempts']}" for t in todo),
                   *sorted(f"{d['input']}:{d['stage']}" for d in decided), *sorted(g["input"] for g in gone),
                   *sorted(f"replaced:{o['input']}:{o['sha256']}" for o in replaced),
                   *sorted(pp["digest"] for pp in parent_parts))
    plan = PartitionPlan(partition=p, decided=decided, gone=gone, replaced=replaced, todo=len(todo))
    empty = [CLAIM_SCHEMA.empty_table() for _ in range(buckets)]
    if dry_run or not (todo or decided or gone):
        plan.part = part if (todo or decided or gone) else None
        return (plan, *empty)
    plan.part = part
    finished = store.finished_part(recipe, part)
    if finished is not None:                           # a re-run: this part was written before
        plan.finished = finished
        kept = [r for r in store.read_table(finished["ledger_url"]).to_pylist()
                if r["status"] == "kept" and r["sha256"] and r["kind"] != "studio"]
        return (plan, *_claims(kept, p, buckets))

    samples, captures, tars = [], {}, {}
    batcher = None
    if cfg.needs_detection():
        batcher = DetectionBatcher(cfg, detectors[p % len(detectors)] if detectors else None)
    for t in todo:
        t_rows, t_samples = _process_input(t, cfg, store_uri, captures, tars, batcher)
        decided += t_rows
        samples += t_samples
    if batcher is not None:
        t_rows, t_samples = _finish_photos(batcher.flush(), cfg)
        decided += t_rows
        samples += t_samples
    unknown = set()
    for cap in captures.values():
        if isinstance(cap, Capture):
            unknown |= set(cfg.cameras or ()) - set(cap.cameras) - set(cap.invalid_cameras)
            cap.close()
    plan.unknown_cameras = sorted(unknown)
    touched = {r["input"] for r in decided} | {s["row"]["input"] for s in samples} | {g["input"] for g in gone}
    plan.samples, plan.previous = samples, {k: previous[k] for k in touched if k in previous}
    plan.rewrites = rewrite_jobs(gone + replaced, previous, parent_records, touched)
    plan.seconds = time.time() - started
    claims = [s["row"] for s in samples if s["row"]["sha256"] and s["kind"] != "studio"]
    return (plan, *_claims(claims, p, buckets))


def changed_in_place(old: dict, listed: dict) -> bool:
    """Whether a photo's listing differs from its ledger row: size or tag (ETag / mtime), each
    compared only where both sides know it (URL-list entries and ledgers written before tags
    have none, so an upgrade re-reads nothing)."""
    if old["kind"] != "image" or listed["kind"] != "image" or old["status"] not in ("kept", "rejected"):
        return False           # (a removed input, e.g. a takedown, stays removed)
    if old["status"] == "rejected" and old["stage"] in ("source", "dedup"):
        return False           # refused by name, or a duplicate: the parent's decision stands
    sizes = (old.get("size"), listed.get("size"))
    tags = (old.get("tag") or "", listed.get("tag") or "")
    return (all(x is not None and x >= 0 for x in sizes) and sizes[0] != sizes[1]) or \
        (all(tags) and tags[0] != tags[1])


def replaced_id(old: dict) -> str:
    """The ledger name of a kept sample whose input was changed in place: its input and the
    hash of the bytes it was made from (the input's own row goes on with the new bytes)."""
    return f"{old['input']}#replaced={old['sha256'][:16]}"


def _whence(t: dict) -> dict:
    """What a ledger row keeps of where an input was listed: its signature and list position."""
    return {"tag": t.get("tag") or "", "list_pos": _pos(t)}


def _pos(row: dict) -> int:
    pos = row.get("list_pos")
    return -1 if pos is None else int(pos)


def _retry_uri(name: str, old: dict, cfg: BuildConfig) -> str:
    """The URL to retry a failed download with: re-read from its row of the list file (the
    ledger keeps no credential, so `old["uri"]` may lack the user:password or signature the
    download needs). The row must still name the same input; otherwise the stored URI."""
    if _pos(old) < 0 or not old["listing"]:
        return old["uri"]
    try:
        target, refused = list_entry_at(old["listing"], _pos(old), cfg.inputs)
    except (Rejected, OSError, ValueError) as exc:
        log.info("cannot re-read row %d of %s (%s): retrying %s as stored", _pos(old),
                 strip_credentials(old["listing"]), redact_text(str(exc)), name)
        return old["uri"]
    return target if not refused and strip_credentials(target) == name else old["uri"]


def rewrite_jobs(gone: list[dict], previous: dict[str, dict], records: list[dict], touched: set[str]) -> dict:
    """Parent shards holding a sample that is gone, to be rewritten without it: shard URL ->
    {drop: keys, keep: ledger rows of the samples that stay, samples, bytes (of the old shard)}."""
    sizes = {s["url"]: (s["samples"], s["bytes"]) for r in records for s in r["shards"]}
    jobs: dict[str, dict] = {}
    for g in gone:
        if g["status"] == "kept" and g["shard"]:
            n, nbytes = sizes[g["shard"]]
            jobs.setdefault(g["shard"], {"drop": [], "keep": [], "samples": n, "bytes": nbytes})["drop"].append(g["key"])
    for old in previous.values():
        if old["status"] == "kept" and old["shard"] in jobs and old["input"] not in touched:
            jobs[old["shard"]]["keep"].append(old)
    return jobs


def _claims(rows: list[dict], p: int, buckets: int) -> list[pa.Table]:
    """Ledger rows of processed photos -> (sha256, input, partition) claims, one table per sha bucket."""
    out: list[list[dict]] = [[] for _ in range(buckets)]
    for r in rows:
        out[sha_bucket(r["sha256"], buckets)].append({"sha256": r["sha256"], "input": r["input"], "partition": p})
    return [pa.Table.from_pylist(b, schema=CLAIM_SCHEMA) for b in out]


def _reject(t: dict, stage: str, reason: str, sha: str = "", input_id: str | None = None) -> dict:
    # ledgers never hold a credential: URL user:password and secret query values are masked
    return ledger_row(input=input_id or t["input_id"], status="rejected", kind=t["kind"],
                      uri=strip_credentials(t["uri"]), listing=t["listing"], stage=stage,
                      reason=redact_text(reason), sha256=sha, size=t["size"], attempts=t["attempts"], **_whence(t))


def _process_input(t: dict, cfg: BuildConfig, store_uri: str, captures: dict, tars: dict, batcher=None):
    """One listed input -> (ledger rows of rejects, processed samples). With a `batcher`
    (detection), the photos' rows come back as their batches finish, maybe another input's."""
    rows, samples = [], []
    try:
        if t["kind"] == "studio":
            if t["uri"] not in captures:
                try:
                    captures[t["uri"]] = Capture(t["uri"], strict=False, max_pixels=cfg.filters.max_pixels,
                                                 inputs=cfg.inputs)
                except DataError as exc:
                    captures[t["uri"]] = Rejected("capture", str(exc))
            cap = captures[t["uri"]]
            if isinstance(cap, Rejected):
                raise cap
            key, members, info = studio_sample(cap, t["frame"], cfg, t["input_id"])
            samples.append(_sample(t, key, members, "studio", "", dropped_views=len(info["dropped"])))
        elif t["kind"] == "wds":
            # every member of the tar gets a ledger row (dataprep.inputs.sources.read_tar)
            contents = read_tar(cached_fetch(t["uri"], cfg, store_uri, "wds"), cfg.inputs.max_bytes)
            names = sorted(set(contents.samples) | set(contents.rejected))
            if not names and not contents.others:
                raise Rejected("decode", "tar holds no samples")
            for name in names:
                m = {**t, "input_id": f"{t['input_id']}#{name}", "member": name}
                if name in contents.rejected:
                    rows.append(_reject(m, "decode", contents.rejected[name]))
                    continue
                image = wds_image(contents.samples[name])
                if image is None:
                    rows.append(_reject(m, "decode", "sample has no image member"))
                    continue
                m["size"] = len(image)
                r, s = _photo(m, bytes(image), cfg, batcher)
                rows += r
                samples += s
            for name in sorted(contents.others):
                rows.append(_reject({**t, "input_id": f"{t['input_id']}#{name}", "member": name}, "decode",
                                    contents.others[name]))
        else:
            data = cached_fetch(t["uri"], cfg, store_uri)
            if not data:
                raise Rejected("decode", "empty file (0 bytes)")
            r, s = _photo({**t, "size": len(data)}, data, cfg, batcher)
            rows += r
            samples += s
    except Rejected as exc:
        rows.append(_reject(t, exc.stage, exc.reason))
    except Exception as exc:    # a bug must not lose the other inputs: record it, loudly
        log.exception("unexpected error on %s", t["input_id"])
        rows.append(_reject(t, "error", f"unexpected {type(exc).__name__}: {exc}"))
    return rows, samples


def _photo(t: dict, data: bytes, cfg: BuildConfig, batcher=None):
    digest = sha256(data)
    try:
        if batcher is None:
            key, members = photo_sample(data, cfg, t["input_id"], digest)
        else:
            photo = prepare_photo(data, cfg)
            return _finish_photos(batcher.add((t, digest, photo), photo.rgb), cfg)
    except Rejected as exc:
        return [_reject(t, exc.stage, exc.reason, sha=digest)], []
    return [], [_sample(t, key, members, "image", digest)]


def _finish_photos(done: list, cfg: BuildConfig):
    """Photos back from the detection stage -> (reject rows, samples)."""
    rows, samples = [], []
    for (t, digest, photo), detections in done:
        try:
            if isinstance(detections, Rejected):
                raise detections
            key, members = finish_photo_sample(photo, cfg, t["input_id"], digest, detections)
            samples.append(_sample(t, key, members, "image", digest))
        except Rejected as exc:
            rows.append(_reject(t, exc.stage, exc.reason, sha=digest))
        except Exception as exc:    # as in _process_input: a bug loses this photo only, loudly
            log.exception("unexpected error on %s", t["input_id"])
            rows.append(_reject(t, "error", f"unexpected {type(exc).__name__}: {exc}", sha=digest))
    return rows, samples


def _sample(t: dict, key: str, members: dict, kind: str, sha: str, dropped_views: int = 0) -> dict:
    row = ledger_row(input=t["input_id"], status="kept", key=key, sha256=sha, kind=t["kind"],
                     uri=strip_credentials(t["uri"]),
                     listing=t["listing"], size=t["size"], attempts=t["attempts"], **_whence(t))
    return {"row": row, "key": key, "members": members, "kind": kind, "dropped_views": dropped_views}


# ---- stage 2: dedup (the sha-keyed shuffle's reduce side) ----------------------------------------

def dedup_bucket(b: int, partitions: int, cfg: BuildConfig, store_uri: str, recipe: str,
                 parent_parts: list[dict], *claims: pa.Table) -> tuple:
    """-> (sha part record or None, losers of partition 0, ..., losers of partition P-1)."""
    store = DatasetStore(store_uri)
    table = pa.concat_tables(claims) if claims else CLAIM_SCHEMA.empty_table()
    known: dict[str, str] = {}
    if cfg.dedup_against_parent and table.num_rows:
        for rec in store.part_records(parent_parts):
            for r in store.read_table(rec["ledger_url"]).to_pylist():
                known.setdefault(r["sha256"], r["input"])
    by_sha: dict[str, list[tuple[str, int]]] = {}
    for r in table.to_pylist():
        by_sha.setdefault(r["sha256"], []).append((r["input"], r["partition"]))
    losers: list[list[dict]] = [[] for _ in range(partitions)]
    index = []
    for sha, claimants in sorted(by_sha.items()):
        claimants.sort()
        if sha in known and known[sha] not in {c[0] for c in claimants}:
            for name, p in claimants:
                losers[p].append({"input": name, "reason": f"duplicate of {known[sha]} (parent)"})
            continue
        winner = claimants[0][0]
        index.append({"sha256": sha, "input": winner})
        for name, p in claimants[1:]:
            if cfg.dedup:
                losers[p].append({"input": name, "reason": f"duplicate of {winner}"})
    record = None
    fresh = [r for r in index if r["sha256"] not in known]
    if fresh:
        part = part_id(recipe, "sha", b, partitions, *(f"{r['sha256']}:{r['input']}" for r in fresh))
        record = store.finished_part(recipe, part) or write_part(store, recipe, part, b, "sha", fresh,
                                                                 schema=SHA_SCHEMA)
    return (record, *[pa.Table.from_pylist(rows, schema=LOSER_SCHEMA) for rows in losers])


# ---- stage 3: write ------------------------------------------------------------------------------

def write_partition(plan: PartitionPlan, shard: ShardLimits, store_uri: str, recipe: str,
                    *losers: pa.Table) -> PartitionResult | None:
    """Shards (at most `shard` each) and the ledger part of one partition (None: nothing to do)."""
    if plan.part is None:
        return None
    if plan.finished is not None:
        return PartitionResult(plan.finished, reused=True)
    started = time.time()
    store = DatasetStore(store_uri)
    lost = {r["input"]: r["reason"] for t in losers for r in t.to_pylist()}
    rows = list(plan.decided)
    writers: dict[str, ShardWriter] = {}

    def writer(kind: str) -> ShardWriter:
        if kind not in writers:
            writers[kind] = ShardWriter(store.shards_url(recipe), f"{plan.part}-{kind[0]}", shard, kind)
        return writers[kind]

    kept, dropped_views = [], 0
    try:
        for s in plan.samples:
            row = s["row"]
            if row["input"] in lost:
                rows.append({**row, "status": "rejected", "key": "", "stage": "dedup", "reason": lost[row["input"]]})
                continue
            w = writer(s["kind"])
            w.add(s["key"], s["members"], row["input"], s["kind"], row["sha256"])
            kept.append((row, s["kind"], len(w.shards)))
            dropped_views += s["dropped_views"]
        # parent shards that held a removed sample: their other samples move to this part's shards
        moved = []
        for shard_url, job in sorted(plan.rewrites.items()):
            drop = set(job["drop"])
            keep = {o["key"]: o for o in job["keep"]}
            for key, members in store.shard_samples(shard_url):
                if key in drop or key not in keep:
                    continue
                kind = keep[key]["kind"] if keep[key]["kind"] == "studio" else "image"
                w = writer(kind)
                w.add(key, members, keep[key]["input"], kind, keep[key]["sha256"])
                moved.append((keep[key], kind, len(w.shards)))
        shards = {kind: w.close() for kind, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for row, kind, n in kept + moved:
        rows.append({**row, "status": "kept", "shard": store.rel(shards[kind][n]["url"])})
    for g in plan.gone:
        stage, reason = plan.gone_reason
        rows.append({**g, "status": "removed", "stage": stage, "reason": reason, "shard": ""})
    for old in plan.replaced:     # the input's own row (above) holds its new bytes
        rows.append({**old, "input": replaced_id(old), "status": "removed", "stage": "source",
                     "reason": "changed in place: read again", "shard": ""})
    counts = ledger_counts(rows, plan.previous | {g["input"]: g for g in plan.gone}
                           | {m[0]["input"]: m[0] for m in moved})
    counts["dropped_views"] = dropped_views
    all_shards = [s for kind in sorted(shards) for s in shards[kind]]
    record = write_part(store, recipe, plan.part, plan.partition, "ledger", rows, all_shards,
                        drops=list(plan.rewrites), extra={
                            "counts": dict(counts),
                            "dropped_samples": sum(j["samples"] for j in plan.rewrites.values()),
                            "dropped_bytes": sum(j["bytes"] for j in plan.rewrites.values())})
    return PartitionResult(record, reused=False, seconds=plan.seconds + time.time() - started)
