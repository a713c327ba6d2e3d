"""Versioned datasets in object storage (SPEC §6): immutable versions as lists of parts.

Layout under a dataset root (any fsspec URL). Every URL a version stores is relative to the root,
so a copied, moved or symlinked dataset keeps working:
    .pippo-dataset                                  marker: this directory is a dataset
    shards/{recipe}/{part}-{kind}{n}.tar (+ .index.parquet)   samples; one sample kind per shard
    parts/{recipe}/{part}.ledger.parquet            a row per input the part decided
    parts/{recipe}/{part}.json                      part record (shards, ledger, counts, digest): LAST
    versions/{id}.json                              version record: summary, parent, recipe, parts_url
    versions/{id}/parts.parquet, stats.json, preview.png
    refs/latest.json, refs/recipe-{recipe}.json     {"id"}: the newest version (of a recipe)
    tags/{name}.json                                {"id"}: mutable
    builds/{uuid}.json                              leases of running builds
    cache/urls/{sha1(url)}                          downloaded URL bodies

A part is what one partition job of one build decided (Delta / Iceberg style: a snapshot is a
list of immutable parts; a commit adds parts and never rewrites one). A version lists its parent's
parts plus its own; its id is a Merkle hash over the part digests, so equal content has an equal
id. Ledgers replay in part order (a later row for an input wins: a retried download, a removed
input), and a part may drop shards of earlier parts it replaced (a takedown rewrites a shard).

A version is listed iff its record exists, and the record is written after everything it
references, so a crash never leaves a half version listed. The record is created with the
store's conditional create (O_EXCL link on local disks, `If-None-Match: *` on S3), so concurrent
builds never overwrite each other. `latest` and tags resolve by reading one small object.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import tarfile
import threading
import time
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pippo_common.errors import DataError
from dataprep.names import validate_tag
from pippo_common.storage import absolute_url, atomic_write_bytes, fs_and_path, is_local, join

log = logging.getLogger("pippo.data.store")

LEASE_TTL_S = 300.0   # a build's lease is live while its heartbeat is younger than this
_WARNED: set[str] = set()   # stray files already warned about (versions() runs often)


class VersionNotFound(DataError):
    pass


class OutsideDataset(DataError):
    """A URL in a version or part record that does not name a file inside the dataset root."""


def _shown(url, limit: int = 80) -> str:
    from pippo_common.redact import redact_text

    text = repr(redact_text(str(url)))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


MARKER = ".pippo-dataset"
FORMAT = 2
# What the store itself names (gc deletes nothing else): shards, their indexes, part files,
# version files, leases, URL cache entries and temporary files of killed writes.
OWN_DIRS = ("shards", "parts", "versions", "refs", "tags", "builds", "cache")


def canonical_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def version_id(part_digests: list[str]) -> str:
    """Content id of a version: a Merkle hash over the digests of its parts (order-free, so the
    same parts, however committed, are the same version)."""
    return hashlib.sha256("\n".join(sorted(part_digests)).encode()).hexdigest()[:20]


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

    def part_path(self, recipe: str, part: str, suffix: str = ".json") -> str:
        return self.path("parts", recipe, f"{part}{suffix}")

    def rel(self, url_or_path: str) -> str:
        """The dataset-relative form of a URL or path inside this dataset (what versions store)."""
        s = str(url_or_path)
        for prefix in (self.uri + "/", self.root + "/"):
            if s.startswith(prefix):
                return s[len(prefix):]
        raise ValueError(f"{s} is not inside the dataset {self.uri}")

    # -- the dataset marker -----------------------------------------------------------------------
    def is_dataset(self) -> bool:
        return self.fs.exists(self.path(MARKER))

    def claim_root(self) -> None:
        """Before a build writes anything: the root must be a dataset (marker), or empty/absent,
        in which case it becomes one. A non-empty directory without the marker is refused, so a
        mistyped `dataset:` never mixes shards into (or later lets gc judge) someone's files."""
        if self.is_dataset():
            return
        try:
            # a concurrent build claiming the same empty root shows its marker's temporary file
            # (atomic_write_bytes) for a moment: that is a claim, not someone else's files
            entries = [p for p in self.fs.ls(self.root, detail=False)
                       if posixpath.basename(p.rstrip("/")) not in ("", MARKER)
                       and not posixpath.basename(p.rstrip("/")).startswith(f"{MARKER}.tmp-")]
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise DataError(f"dataset {self.uri} is a file, not a directory")
        if entries:
            raise DataError(f"refusing to use {self.uri} as a dataset: the directory is not empty and "
                            f"has no {MARKER} marker (pick an empty directory or an existing dataset)")
        atomic_write_bytes(self.url(MARKER), json.dumps({"format": FORMAT}).encode())

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

    # -- versions, refs and tags ------------------------------------------------------------------
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
                and (not record or (obj["id"] == name[:-5] and obj.get("format") == FORMAT))):
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

    def _record(self, path: str) -> dict | None:
        """A version record, or None (one warning) for a file that is not one (a stray notes.json)."""
        return self._read_listed(path, ("id", "created"), record=True)

    def versions(self) -> list[dict]:
        """Every listed version, newest first, with its tags (reads every record: for listing)."""
        self.fs.invalidate_cache()
        records = [r for r in (self._record(p) for p in self._ls("versions") if p.endswith(".json")) if r]
        by_id: dict[str, list[str]] = {}
        for name, vid in self._tags().items():
            by_id.setdefault(vid, []).append(name)
        for r in records:
            r["tags"] = sorted(by_id.get(r["id"], []))
        return sorted(records, key=lambda r: (r["created"], r["id"]), reverse=True)

    def _by_id(self, vid: str) -> dict | None:
        record = self._record(self.path("versions", f"{vid}.json"))
        if record is not None:
            record["tags"] = sorted(n for n, t in self._tags().items() if t == vid)
        return record

    def _pointer(self, *parts: str) -> str | None:
        try:
            return self.read_json(self.path(*parts))["id"]
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
            return None

    def resolve(self, ref: str | None, recipe: str | None = None) -> dict:
        """A version by id, unique id prefix, tag, or 'latest' (of `recipe`, if given). Tags and
        `latest` read one small pointer object; a prefix lists names only."""
        self.fs.invalidate_cache()
        if self.fs.isfile(self.root):
            raise DataError(f"{self.uri} is not a dataset (it is a file)")
        ref = ref or "latest"
        if ref == "latest":
            vid = self._pointer("refs", f"recipe-{recipe}.json" if recipe else "latest.json")
            record = self._by_id(vid) if vid else None
            if record is None:     # no pointer (a store written by hand): the newest record
                record = next((v for v in self.versions() if recipe is None or v.get("recipe") == recipe), None)
            if record is None:
                raise VersionNotFound(f"{self.uri}: no versions" + (f" of recipe {recipe}" if recipe else ""))
            return record
        if not all(c.isalnum() or c in "-_." for c in ref) or len(ref) > 128:
            raise VersionNotFound(f"{self.uri}@{ref[:40]!r}: not a version id or tag")
        vid = self._pointer("tags", f"{ref}.json")
        if vid and (record := self._by_id(vid)):
            return record
        if (record := self._by_id(ref)) is not None:
            return record
        names = [posixpath.basename(p)[:-5] for p in self._ls("versions")
                 if p.endswith(".json") and posixpath.basename(p).startswith(ref)]
        matches = [r for r in (self._by_id(n) for n in names) if r]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise VersionNotFound(f"{self.uri}@{ref}: ambiguous prefix ({len(matches)} versions)")
        raise VersionNotFound(f"{self.uri}@{ref}: no such version or tag")

    def commit_version(self, record: dict) -> bool:
        """Write the version record (a build's last write), then move the `latest` pointers.
        False if the record already existed (same content committed before)."""
        record = {k: v for k, v in record.items() if k != "tags"}
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        created = self.create_exclusive(self.path("versions", f"{record['id']}.json"), data)
        self._advance("refs", "latest.json", record)
        self._advance("refs", f"recipe-{record['recipe']}.json", record)
        return created

    def _advance(self, *parts: str) -> None:
        """Point `parts` at `record` unless it already points at a newer version. (Two commits
        racing here may leave the older one; `versions` still lists both.)"""
        *path, record = parts
        current = self._pointer(*path)
        if current and current != record["id"]:
            cur = self._by_id(current)
            if cur and (cur["created"], cur["id"]) >= (record["created"], record["id"]):
                return
        self.write_json(self.path(*path), {"id": record["id"], "created": record["created"]})

    def tag(self, ref: str, name: str) -> str:
        validate_tag(name)
        vid = self.resolve(ref)["id"]
        self.write_json(self.path("tags", f"{name}.json"), {"id": vid, "updated": _now()})
        return vid

    def untag(self, name: str) -> str:
        validate_tag(name)
        vid = self._pointer("tags", f"{name}.json")
        if vid is None:
            raise VersionNotFound(f"{self.uri}: no tag {name!r}")
        self.fs.rm(self.path("tags", f"{name}.json"))
        return vid

    # -- tables -----------------------------------------------------------------------------------
    def read_table(self, url: str, columns: list[str] | None = None) -> pa.Table:
        """One of the store's parquet files (parts lists, ledgers, shard indexes), read in this
        thread. Not pq.read_table: it goes through Arrow's dataset scanner, which starts Arrow's
        thread pools even with use_threads=False, and those pools race their static destructors at
        interpreter exit (`terminate called without an active exception`, SIGABRT, about one run
        of `pippo data show` in 12). ParquetFile.read without threads starts none."""
        fs, path = self._fs_path(url)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f, pre_buffer=False).read(columns=columns, use_threads=False)

    def write_table(self, url: str, table: pa.Table, exclusive: bool = False) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        if exclusive:
            self.create_exclusive(self._fs_path(url)[1], sink.getvalue().to_pybytes())
        else:
            atomic_write_bytes(self.resolve_url(url), sink.getvalue().to_pybytes())

    # -- parts ------------------------------------------------------------------------------------
    def shard_intact(self, shard: dict) -> bool:
        fs, path = self._fs_path(shard["url"])
        try:
            return fs.info(path)["size"] == shard["bytes"]
        except FileNotFoundError:
            return False

    def finished_part(self, recipe: str, part: str) -> dict | None:
        """The record of a finished part whose shards are all still there, else None."""
        try:
            record = self.read_json(self.part_path(recipe, part))
        except FileNotFoundError:
            return None
        return record if all(self.shard_intact(s) for s in record["shards"]) else None

    def version_parts(self, record: dict, partition: int | None = None) -> list[dict]:
        """The version's parts in commit order (parent's first): {part, partition, kind, digest, url}."""
        rows = self.read_table(record["parts_url"]).to_pylist()
        return [r for r in rows if partition is None or r["partition"] == partition]

    def part_records(self, parts: list[dict]) -> list[dict]:
        """The part records (JSON) of `parts`, fetched in one concurrent batch."""
        paths = [self._fs_path(p["url"])[1] for p in parts]
        blobs = self.fs.cat(paths) if paths else {}
        return [json.loads(blobs[p]) for p in paths]

    # -- reading a version: the training loader goes through these only, never through paths, so
    # the on-store layout can change behind them.
    def resolve_url(self, url: str) -> str:
        """Absolute URL of a URL a version stores: relative ones (what builds write: a copied or
        moved dataset keeps working, SPEC §6) against the dataset root; absolute ones only when
        they already lie inside the root. Records are input (anyone who can write the dataset
        root can write them): a URL that leaves the root (`http://...`, `file:///etc/...`,
        `../other`) is refused, so reading a version never fetches or reads anything else."""
        if not isinstance(url, str) or not url or "\0" in url or "::" in url:
            raise OutsideDataset(f"{self.uri}: a version record names {_shown(url)}: not a URL inside the dataset")
        if "://" in url or url.startswith("/"):
            resolved = absolute_url(url)
            inside = resolved.startswith(self.uri + "/")
        else:
            resolved, inside = self.url(url), True
        if not inside or ".." in resolved[len(self.uri) + 1:].split("/"):
            raise OutsideDataset(f"{self.uri}: a version record names {_shown(url)}, outside the dataset "
                                 "root: refused (records name files of their own dataset only)")
        return resolved

    def _fs_path(self, url: str):
        """(fs, path) of a URL; inside this dataset through the store's own filesystem (so its
        storage options apply), elsewhere through fsspec."""
        url = self.resolve_url(url)
        if url.startswith(self.uri + "/"):
            return self.fs, self.path(url[len(self.uri) + 1:])
        return fs_and_path(url)

    def version_shards(self, record: dict) -> list[dict]:
        """Shards of a version in part order: {url, samples, bytes, sha256, index_url, kind}, URLs absolute."""
        parts = [p for p in self.version_parts(record) if p["kind"] == "ledger"]
        records = self.part_records(parts)
        dropped = {d for r in records for d in r.get("drops", [])}
        return [{**s, "url": self.resolve_url(s["url"]), "index_url": self.resolve_url(s["index_url"])}
                for r in records for s in r["shards"] if s["url"] not in dropped]

    def describe(self, record: dict) -> dict:
        """The SPEC §6 document of a version: the record plus the shard list assembled from its parts."""
        shards = self.version_shards(record)
        urls = {k: self.resolve_url(v) for k, v in record.items() if k.endswith("_url") and isinstance(v, str)}
        return {**record, **urls, "shards": [{k: s[k] for k in ("url", "samples", "bytes", "sha256")} for s in shards],
                "rejects_url": urls["parts_url"]}

    def shard_index(self, shard: dict) -> pa.Table:
        """The samples of a shard in tar order: a table with columns key, kind."""
        return self.read_table(shard["index_url"], columns=["key", "kind"])

    def shard_members(self, shard: dict) -> pa.Table | None:
        """Columns key, members (byte offsets of each member's data, dataprep.store.shards.MEMBER_TYPE)
        of a shard's index; None for an index written before offsets were recorded."""
        fs, path = self._fs_path(shard["index_url"])
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f, pre_buffer=False)
            if "members" not in pf.schema_arrow.names:
                return None
            return pf.read(columns=["key", "members"], use_threads=False)

    def shard_ranges(self, shard: dict, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes [a, b) of a shard's tar for each range: one open and seeks on a local file,
        exact concurrent range requests on an object store (a buffered remote file would read
        whole blocks of many MB around each range)."""
        fs, path = self._fs_path(shard["url"])
        if is_local(fs):
            out = []
            with fs.open(path, "rb") as f:
                for a, b in ranges:
                    f.seek(a)
                    out.append(f.read(b - a))
            return out
        return fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])

    def open_shard(self, shard: dict):
        """A binary read stream of a shard's tar (sequential reads; the caller closes it)."""
        fs, path = self._fs_path(shard["url"])
        return fs.open(path, "rb")

    def shard_samples(self, url: str):
        """Samples of a shard in tar order, streamed (a shard may be ~1 GB): (key, {ext: bytes})."""
        key, sample = None, {}
        with self.open_shard({"url": url}) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                k, _, ext = member.name.partition(".")
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext] = tar.extractfile(member).read()
        if sample:
            yield key, sample

    # -- leases -----------------------------------------------------------------------------------
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



class BuildLease:
    """`builds/{id}.json` = {recipe, parent, heartbeat}, refreshed every LEASE_TTL_S/4 by a
    daemon thread while a build runs and removed when it ends: gc leaves alone the shards of the
    lease's recipe and the parent version (a killed build's lease simply expires)."""

    def __init__(self, store: DatasetStore, recipe: str, parent: str | None, register: bool = True):
        self.store, self.recipe, self.parent, self.register = store, recipe, parent, register
        self.path = store.path("builds", f"{uuid.uuid4().hex}.json")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self):
        self.store.write_json(self.path, {"recipe": self.recipe, "parent": self.parent, "heartbeat": time.time()})

    def _beat(self):
        while not self._stop.wait(LEASE_TTL_S / 4):
            self._write()

    def set_parent(self, parent: str | None) -> None:
        self.parent = parent
        if self.register:
            self._write()

    def __enter__(self):
        if self.register:       # a dry run writes nothing, not even a lease
            self._write()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.register:
            self._stop.set()
            self._thread.join()
            self.store.fs.rm(self.path)


def diff(a: dict, b: dict) -> dict:
    """Shards added and removed from version a to version b (as `DatasetStore.describe` gives them)."""
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
