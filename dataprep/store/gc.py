"""`pippo data gc`: delete what no listed version references — and nothing else, ever.

Safety rules (covered by the gc tests of tests/integration/test_build_versions.py and
tests/integration/test_build_resilience.py):
  * only a dataset (its root carries the `.pippo-dataset` marker) is collected;
  * only files of the store's own naming are candidates (shards and their indexes, part files,
    files of un-listed versions, expired leases, URL cache entries, temporary files of killed
    writes); anything else is a foreign file, counted and left alone;
  * a file referenced by any listed version is kept. References are dataset-relative, so a
    copied, moved or symlinked dataset is judged by its own listing;
  * the recipes of running builds (their leases) are left alone, and so are their parents; a
    build takes its lease before it resolves its parent, and checks every shard it lists again
    (the parent's too) before it commits, so a gc it could not see fails it loudly, never silently;
  * files younger than the grace period are kept (a build that lost its lease).
"""
from __future__ import annotations

import logging
import posixpath
import re
import time

from pippo_common.errors import DataError
from dataprep.store.core import LEASE_TTL_S, MARKER, DatasetStore

log = logging.getLogger("pippo.data.gc")

_HEX = "[0-9a-f]"
_TMP = r"(\.tmp-[A-Za-z0-9_]+|\.[^/]+\.tmp-[A-Za-z0-9_]+)"
# store-relative paths the store itself names
SHARD = re.compile(rf"^shards/{_HEX}{{16}}/({_HEX}{{20}}-[a-z]\d{{4}}|{_HEX}{{16}}-\d{{4}})\.(tar|index\.parquet)$")
PART = re.compile(rf"^parts/{_HEX}{{16}}/{_HEX}{{20}}\.(json|ledger\.parquet|sha\.parquet)$")
VERSION_FILE = re.compile(rf"^versions/{_HEX}{{20}}(\.json|/(parts\.parquet|stats\.json|preview\.png))$")
LEASE = re.compile(rf"^builds/{_HEX}{{32}}\.json$")
CACHE = re.compile(rf"^cache/urls/{_HEX}{{40}}$")
TEMP = re.compile(rf"^(shards|parts|versions|refs|tags|builds|cache)/.*{_TMP}$")


def collect(store: DatasetStore, keep_last: int | None = None, grace_s: float = 3600.0,
            dry_run: bool = False, cache_ttl_s: float = 7 * 86400.0) -> dict:
    if keep_last is not None and keep_last < 0:
        raise DataError(f"--keep-last must be >= 0 (got {keep_last})")
    if grace_s < 0:
        raise DataError(f"--grace-seconds must be >= 0 (got {grace_s})")
    if not store.is_dataset():
        raise DataError(f"{store.uri} is not a dataset (no {MARKER} marker): nothing collected")
    leases = store.live_leases()
    busy_recipes = {lease["recipe"] for lease in leases}
    busy_versions = {lease["parent"] for lease in leases if lease.get("parent")}
    dropped_versions = []
    if keep_last is not None:
        untagged = [v for v in store.versions() if not v["tags"] and v["id"] not in busy_versions]
        for v in untagged[keep_last:]:
            dropped_versions.append(v["id"])
            if not dry_run:     # un-list first (the record), its files become unreferenced below
                store.fs.rm(store.path("versions", f"{v['id']}.json"))
    listed = store.versions()
    if dry_run:
        listed = [v for v in listed if v["id"] not in dropped_versions]
    referenced = _references(store, listed)
    now = time.time()
    deleted, kept_young, foreign = [], 0, 0
    for path in _walk(store):
        rel = posixpath.relpath(path, store.root)
        if rel == MARKER or rel.startswith(("refs/", "tags/")) and not TEMP.match(rel):
            continue
        if TEMP.match(rel):
            doomed = now - _mtime(store, path) >= grace_s
        elif LEASE.match(rel):
            doomed = now - _mtime(store, path) >= LEASE_TTL_S and not _live(store, path)
        elif CACHE.match(rel):
            doomed = now - _mtime(store, path) >= cache_ttl_s
        elif SHARD.match(rel) or PART.match(rel) or VERSION_FILE.match(rel):
            key = rel[: -len(".index.parquet")] + ".tar" if rel.endswith(".index.parquet") else rel
            recipe = rel.split("/")[1] if rel.startswith(("shards/", "parts/")) else None
            version = rel.split("/")[1][:20] if rel.startswith("versions/") else None
            if key in referenced or recipe in busy_recipes or version in busy_versions:
                continue
            if now - _mtime(store, path) < grace_s:
                kept_young += 1
                continue
            doomed = True
        else:
            foreign += 1
            continue
        if doomed:
            deleted.append(path)
    if not dry_run:
        # part records first: a record must never outlive the files it vouches for
        for path in sorted(deleted, key=lambda p: not p.endswith(".json")):
            store.fs.rm(path)
    log.info("gc %s: %s %d files, %d unreferenced but younger than %ss kept, %d foreign files left "
             "alone, %d versions un-listed", store.uri, "would delete" if dry_run else "deleted",
             len(deleted), kept_young, grace_s, foreign, len(dropped_versions))
    return {"deleted": len(deleted), "kept_young": kept_young, "foreign": foreign, "dry_run": dry_run,
            "versions_dropped": dropped_versions,
            "files": [posixpath.relpath(p, store.root) for p in deleted] if dry_run else []}


def _references(store: DatasetStore, versions: list[dict]) -> set[str]:
    """Dataset-relative paths every listed version needs: its files, parts and shards."""
    refs: set[str] = set()
    seen_parts: set[str] = set()
    for v in versions:
        for key in ("parts_url", "stats_url", "preview_url"):
            refs.add(store.rel(store.resolve_url(v[key])))
        refs.add(f"versions/{v['id']}.json")
        parts = [p for p in store.version_parts(v) if p["url"] not in seen_parts]
        seen_parts.update(p["url"] for p in parts)
        for record in store.part_records(parts):
            part = f"parts/{record['recipe']}/{record['part']}"
            refs.update({f"{part}.json", store.rel(store.resolve_url(record["ledger_url"]))})
            # a part's shards stay while a version lists the part, even if a later part dropped
            # them: an older listed version may still read them
            refs.update(store.rel(store.resolve_url(s["url"])) for s in record["shards"])
    return refs


def _walk(store: DatasetStore) -> list[str]:
    out = []
    for top in ("shards", "parts", "versions", "builds", "cache", "refs", "tags"):
        try:
            out += store.fs.find(store.path(top))
        except FileNotFoundError:
            continue
    try:   # foreign files at the top level are counted too
        out += [p for p in store.fs.ls(store.root, detail=False) if store.fs.isfile(p)]
    except FileNotFoundError:
        pass
    return sorted(set(out))


def _live(store: DatasetStore, path: str) -> bool:
    try:
        return time.time() - store.read_json(path)["heartbeat"] < LEASE_TTL_S
    except Exception:     # unreadable: a killed write; the mtime rule applies
        return False


def _mtime(store: DatasetStore, path: str) -> float:
    info = store.fs.info(path)
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return time.time()
