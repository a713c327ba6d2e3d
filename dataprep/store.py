"""Versioned datasets in object storage (SPEC §6): immutable versions, mutable tags, gc.

Layout under a dataset URI (any fsspec URL):
    shards/{recipe}/{unit}-{part}.tar (+ .index.parquet)   samples, written by build units
    units/{recipe}/{unit}.json                               unit marker: a finished unit (last write)
    cache/urls/{sha1(url)}                                   downloaded URL bytes, reused by re-runs
    versions/{id}/manifest.parquet, rejects.parquet, inputs.parquet, stats.json, preview.png
    versions/{id}.json                                       the version record, written LAST
    tags/{name}.json                                         {"id": version id}: mutable

A version is listed iff its record exists, and the record is written after everything it
references, so a crash never leaves a half version listed. Versions never conflict: the id is
derived from the manifest's content and the record is created with the store's conditional
create (O_EXCL link on local disks, `If-None-Match: *` on S3), so two concurrent builds each
commit their own version (or, with identical content, the same one) and nothing is overwritten.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.errors import DataError
from dataprep.names import validate_tag
from dataprep.storage import absolute_url, atomic_write_bytes, fs_and_path, is_local, join

log = logging.getLogger("pippo.data.store")

LEASE_TTL_S = 300.0   # a build's lease is live while its heartbeat is younger than this
_WARNED: set[str] = set()   # stray files already warned about (versions() runs often)


class VersionNotFound(DataError):
    pass


def version_id(shards: list[dict], rejects_digest: str, inputs_digest: str) -> str:
    """Content id of a version: its shards (url, samples, bytes, sha256) and ledgers."""
    canon = json.dumps({"shards": sorted([s["url"], s["samples"], s["bytes"], s["sha256"]] for s in shards),
                        "rejects": rejects_digest, "inputs": inputs_digest}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:20]


def table_digest(table: pa.Table) -> str:
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


class DatasetStore:
    def __init__(self, uri: str, **storage_options):
        self.uri = absolute_url(str(uri).rstrip("/"))
        self.fs, self.root = fs_and_path(self.uri, **storage_options)

    # -- paths ------------------------------------------------------------------------------------
    def url(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shards_url(self, recipe: str) -> str:
        return self.url("shards", recipe)

    def unit_marker_path(self, recipe: str, unit: str) -> str:
        return self.path("units", recipe, f"{unit}.json")

    # -- small JSON objects -----------------------------------------------------------------------
    def read_json(self, path: str):
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, path: str, obj) -> None:
        atomic_write_bytes(self._url_of(path), json.dumps(obj, indent=1, sort_keys=True).encode())

    def _url_of(self, path: str) -> str:
        return self.url(posixpath.relpath(path, self.root))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` only if absent (atomic); False if it already existed."""
        if is_local(self.fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)          # atomic, fails if the name exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            # s3fs maps a 412 that does not name If-None-Match (SeaweedFS, some gateways) to EINVAL
            if exc.errno == errno.EINVAL and "precondition" in str(exc).lower().replace("-", ""):
                return False
            raise

    # -- versions ---------------------------------------------------------------------------------
    def _tags(self) -> dict[str, str]:
        tags = {}
        for p in self._ls("tags"):
            if p.endswith(".json"):
                tag = self._read_listed(p, ("id",))
                if tag is not None:
                    tags[posixpath.basename(p)[:-5]] = tag["id"]
        return tags

    def _read_listed(self, path: str, keys: tuple[str, ...], record: bool = False) -> dict | None:
        """A version record or tag file, or None (with one warning) for a stray file that is not
        one (e.g. someone's versions/notes.json): a listing never fails on a file it did not write."""
        try:
            obj = self.read_json(path)
        except FileNotFoundError:
            return None                         # removed between the listing and the read
        except (ValueError, RecursionError):    # not JSON / not UTF-8 / absurdly nested
            obj = None
        name = posixpath.basename(path)
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in keys)
                and (not record or (obj["id"] == name[:-5] and isinstance(obj.get("shards"), list)))):
            if path not in _WARNED:
                _WARNED.add(path)
                log.warning("%s: ignoring %s: not a file of this store", self.uri,
                            posixpath.relpath(path, self.root))
            return None
        return obj

    def _ls(self, *parts: str) -> list[str]:
        try:
            return sorted(self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise DataError(f"{self.uri} is not a dataset (it is a file)") from None

    def versions(self) -> list[dict]:
        """Every listed version, newest first, with its tags."""
        self.fs.invalidate_cache()
        records = [r for p in self._ls("versions") if p.endswith(".json")
                   if (r := self._read_listed(p, ("id", "created"), record=True)) is not None]
        by_id: dict[str, list[str]] = {}
        for name, vid in self._tags().items():
            by_id.setdefault(vid, []).append(name)
        for r in records:
            r["tags"] = sorted(by_id.get(r["id"], []))
        return sorted(records, key=lambda r: (r["created"], r["id"]), reverse=True)

    def resolve(self, ref: str | None) -> dict:
        """A version by id, unique id prefix, tag, or 'latest'."""
        versions = self.versions()
        if not versions:
            raise VersionNotFound(f"{self.uri}: no versions")
        ref = ref or "latest"
        if ref == "latest":
            return versions[0]
        tagged = [v for v in versions if ref in v["tags"]]
        if tagged:
            return tagged[0]
        matches = [v for v in versions if v["id"].startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise VersionNotFound(f"{self.uri}@{ref}: ambiguous prefix ({len(matches)} versions)")
        raise VersionNotFound(f"{self.uri}@{ref}: no such version or tag")

    def commit_version(self, record: dict) -> bool:
        """Write the version record (the last write of a build). False if it already existed."""
        record = {k: v for k, v in record.items() if k != "tags"}
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        return self.create_exclusive(self.path("versions", f"{record['id']}.json"), data)

    def tag(self, ref: str, name: str) -> str:
        validate_tag(name)
        vid = self.resolve(ref)["id"]
        self.write_json(self.path("tags", f"{name}.json"), {"id": vid, "updated": _now()})
        return vid

    def read_table(self, url: str) -> pa.Table:
        fs, path = fs_and_path(url)
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    def write_table(self, url: str, table: pa.Table, exclusive: bool = False) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        if exclusive:
            self.create_exclusive(fs_and_path(url)[1], sink.getvalue().to_pybytes())
        else:
            atomic_write_bytes(url, sink.getvalue().to_pybytes())

    # -- units and leases -------------------------------------------------------------------------
    def shard_intact(self, shard: dict) -> bool:
        try:
            return self.fs.info(fs_and_path(shard["url"])[1])["size"] == shard["bytes"]
        except FileNotFoundError:
            return False

    def finished_unit(self, recipe: str, unit: str) -> dict | None:
        """The marker of a finished unit whose shards are all still there, else None."""
        try:
            marker = self.read_json(self.unit_marker_path(recipe, unit))
        except FileNotFoundError:
            return None
        return marker if all(self.shard_intact(s) for s in marker["shards"]) else None

    def live_leases(self) -> list[dict]:
        """Leases of builds that are running now (heartbeat within LEASE_TTL_S)."""
        live = []
        for path in self._ls("builds"):
            try:
                lease = self.read_json(path)
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if path.endswith(".json") and time.time() - lease["heartbeat"] < LEASE_TTL_S:
                live.append(lease)
        return live

    # -- gc ---------------------------------------------------------------------------------------
    def gc(self, keep_last: int | None = None, grace_s: float = 3600.0, dry_run: bool = False) -> dict:
        """Delete shards (and unit markers) no listed version references.

        Never touched: shards referenced by a listed version; the recipes and parents of running
        builds (their lease, see BuildLease); files younger than `grace_s` (a build that lost its
        lease). `keep_last` first un-lists all but the newest N untagged versions (tagged versions
        and the parents of running builds are always kept).
        """
        leases = self.live_leases()
        busy_recipes = {lease["recipe"] for lease in leases}
        busy_versions = {lease["parent"] for lease in leases}
        dropped_versions = []
        if keep_last is not None:
            untagged = [v for v in self.versions() if not v["tags"] and v["id"] not in busy_versions]
            for v in untagged[keep_last:]:
                dropped_versions.append(v["id"])
                if not dry_run:
                    self.fs.rm(self.path("versions", f"{v['id']}.json"))
                    self.fs.rm(self.path("versions", v["id"]), recursive=True)
        referenced = {fs_and_path(s["url"])[1] for v in self.versions() for s in v["shards"]}
        now = time.time()
        deleted, kept_young = [], 0

        def busy(path: str) -> bool:
            rel = posixpath.relpath(path, self.root).split("/")
            return len(rel) > 2 and rel[1] in busy_recipes

        for path in self._find("shards"):
            shard = path[: -len(".index.parquet")] + ".tar" if path.endswith(".index.parquet") else path
            if shard in referenced or busy(path):
                continue
            if now - self._mtime(path) < grace_s:
                kept_young += 1
                continue
            deleted.append(path)
        # A unit marker vouches for its shards: it goes with them. Temporary files of killed
        # writes go once they are older than the grace period.
        doomed = set(deleted)
        for path in self._find("units") + self._find("versions") + self._find("builds"):
            name = posixpath.basename(path)
            if ".tmp-" in name or path.startswith(self.path("builds") + "/"):
                # temporary files of killed writes, expired leases of killed builds
                stale = LEASE_TTL_S if ".tmp-" not in name else grace_s
                if now - self._mtime(path) >= stale:
                    deleted.append(path)
            elif path.startswith(self.path("units") + "/") and not busy(path) and name.endswith(".json") \
                    and any(fs_and_path(s["url"])[1] in doomed for s in self.read_json(path)["shards"]):
                deleted.append(path)
        if not dry_run:
            # markers first: a marker must never outlive the shards it vouches for
            for path in sorted(deleted, key=lambda p: "/units/" not in p):
                self.fs.rm(path)
        log.info("gc %s: %d files deleted, %d unreferenced but younger than %ss kept, %d versions un-listed",
                 self.uri, len(deleted), kept_young, grace_s, len(dropped_versions))
        return {"deleted": len(deleted), "kept_young": kept_young, "versions_dropped": dropped_versions}

    def _find(self, *parts: str) -> list[str]:
        try:
            return sorted(self.fs.find(self.path(*parts)))
        except FileNotFoundError:
            return []

    def _mtime(self, path: str) -> float:
        info = self.fs.info(path)
        for key in ("mtime", "LastModified", "last_modified", "created"):
            value = info.get(key)
            if value is not None:
                return value.timestamp() if hasattr(value, "timestamp") else float(value)
        return time.time()

    # -- reading a version: the training loader goes through these only, never through paths, so
    # the on-store layout (absolute or dataset-relative URLs, index files) can change behind them.
    def resolve_url(self, url: str) -> str:
        """Absolute URL of a URL a version stores: absolute ones as they are, relative ones (a
        copied or moved dataset, SPEC §6) against the dataset root."""
        if "://" in url or url.startswith("/"):
            return absolute_url(url)
        return self.url(url)

    def _fs_path(self, url: str):
        """(fs, path) of a URL; inside this dataset through the store's own filesystem (so its
        storage options apply), elsewhere through fsspec."""
        url = self.resolve_url(url)
        if url.startswith(self.uri + "/"):
            return self.fs, self.path(url[len(self.uri) + 1:])
        return fs_and_path(url)

    def version_shards(self, record: dict) -> list[dict]:
        """Shards of a version in manifest order: {url, samples, bytes, sha256, index_url}, URLs absolute."""
        if record.get("manifest_url"):
            fs, path = self._fs_path(record["manifest_url"])
            with fs.open(path, "rb") as f:
                rows = pq.read_table(f).to_pylist()
        else:   # a record without a manifest: the index lies beside its shard (ShardWriter naming)
            rows = [{**s, "index_url": s["url"][: -len(".tar")] + ".index.parquet"} for s in record["shards"]]
        # shards an incremental build carried over from its parent may lack index_url in the
        # manifest: their index lies beside them under the ShardWriter's naming
        return [{"url": self.resolve_url(r["url"]), "samples": int(r["samples"]), "bytes": int(r["bytes"]),
                 "sha256": r.get("sha256", ""),
                 "index_url": self.resolve_url(r.get("index_url") or r["url"][: -len(".tar")] + ".index.parquet")}
                for r in rows]

    def shard_index(self, shard: dict) -> pa.Table:
        """The samples of a shard in tar order: a table with columns key, kind."""
        fs, path = self._fs_path(shard["index_url"])
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=["key", "kind"])

    def open_shard(self, shard: dict):
        """A binary read stream of a shard's tar (sequential reads; the caller closes it)."""
        fs, path = self._fs_path(shard["url"])
        return fs.open(path, "rb")


class BuildLease:
    """`builds/{id}.json` = {recipe, parent, heartbeat}, refreshed every LEASE_TTL_S/4 by a
    daemon thread while a build runs and removed when it ends: gc leaves alone the shards of the
    lease's recipe and the parent version (a killed build's lease simply expires)."""

    def __init__(self, store: DatasetStore, recipe: str, parent: str | None):
        self.store, self.recipe, self.parent = store, recipe, parent
        self.path = store.path("builds", f"{uuid.uuid4().hex}.json")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self):
        self.store.write_json(self.path, {"recipe": self.recipe, "parent": self.parent, "heartbeat": time.time()})

    def _beat(self):
        while not self._stop.wait(LEASE_TTL_S / 4):
            self._write()

    def __enter__(self):
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.store.fs.rm(self.path)


def diff(a: dict, b: dict) -> dict:
    """Shards added and removed from version a to version b, with sample counts."""
    sa = {s["url"]: s for s in a["shards"]}
    sb = {s["url"]: s for s in b["shards"]}
    added = [sb[u] for u in sorted(set(sb) - set(sa))]
    removed = [sa[u] for u in sorted(set(sa) - set(sb))]
    return {"from": a["id"], "to": b["id"],
            "shards_added": added, "shards_removed": removed,
            "samples_added": sum(s["samples"] for s in added),
            "samples_removed": sum(s["samples"] for s in removed),
            "samples_from": a["samples"], "samples_to": b["samples"]}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def split_ref(ref: str) -> tuple[str, str]:
    """'URI@REF' -> (URI, REF); a URI without @ means latest."""
    uri, sep, name = ref.rpartition("@")
    if not sep or "/" in name:
        return ref, "latest"
    return uri, name or "latest"
