"""Inputs that change under the build (issue 17): photos replaced in place are read again and
untouched ones are not; failed downloads of credentialed URLs are retried from their list row;
directories and URL lists are listed in split tasks, never by the driver."""
import base64
import hashlib
import http.server
import os
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dataprep.build import listing as listing_mod
import dataprep.store.ledger as ledgers
from dataprep.build.job import run_build
from dataprep.build_config import HttpConfig
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_images
from support import build_in, cfg_for, free_port


def keys_of(version) -> list[str]:
    """Every sample key of a version's shards, duplicates included."""
    urls = [s["url"].removeprefix("file://") for s in version["shards"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]


def jpg_of(version, key: str) -> bytes:
    urls = [s["url"].removeprefix("file://") for s in version["shards"]]
    return next(s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False) if s["__key__"] == key)


def test_a_photo_replaced_in_place_is_read_again_and_an_untouched_one_is_not(tmp_path, ray_local):
    src = tmp_path / "src"
    photos = sorted(synth_images(src, count=6, seed=81, person_fraction=1.0))
    store = DatasetStore(tmp_path / "ds")
    v1 = build_in(store, [("images", src)])
    assert v1["counts"] == {"inputs": 6, "kept": 6, "rejected": 0, "removed": 0}
    rows1 = {r["input"]: r for r in ledgers.ledger(store, v1).to_pylist()}
    replaced, touched, untouched = photos[0], photos[1], photos[2:]
    # replaced: other bytes under the same name; touched: the same bytes, a new mtime
    fresh = synth_images(tmp_path / "other", count=1, seed=82, person_fraction=1.0)[0].read_bytes()
    st = replaced.stat()
    replaced.write_bytes(fresh)
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    # the untouched ones are garbled with their size and mtime kept: were one read, it would
    # be rejected as undecodable (root reads a chmod 000 file, so that would prove nothing)
    for p in untouched:
        st = p.stat()
        p.write_bytes(b"\0" * st.st_size)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    v2 = build_in(store, [("images", src)])
    rows2 = {r["input"]: r for r in ledgers.ledger(store, v2).to_pylist()}
    url = {p: f"file://{p}" for p in photos}
    # the new bytes are the sample; the old sample is removed under its own ledger name
    new = rows2[url[replaced]]
    assert new["status"] == "kept" and new["sha256"] == hashlib.sha256(fresh).hexdigest()
    assert new["size"] == len(fresh) and new["tag"] != rows1[url[replaced]]["tag"]
    old_sha = rows1[url[replaced]]["sha256"]
    gone = rows2[f"{url[replaced]}#replaced={old_sha[:16]}"]
    assert (gone["status"], gone["stage"], gone["sha256"]) == ("removed", "source", old_sha)
    assert "changed in place" in gone["reason"]
    assert rows2[url[touched]]["status"] == "kept" and rows2[url[touched]]["sha256"] == rows1[url[touched]]["sha256"]
    assert f"{url[touched]}#replaced={rows1[url[touched]]['sha256'][:16]}" in rows2
    # untouched photos were not read: their rows are the parent's, not rejects of garbled bytes
    # (one sharing a shard with a replaced sample moved to a rewritten shard, its bytes copied)
    for p in untouched:
        assert {**rows2[url[p]], "shard": ""} == {**rows1[url[p]], "shard": ""}
    assert v2["counts"] == {"inputs": 8, "kept": 6, "rejected": 0, "removed": 2}
    # the old sample left its shard (rewritten without it): one sample per key, the new bytes
    keys = keys_of(v2)
    assert len(keys) == len(set(keys)) == 6
    assert jpg_of(v2, new["key"]) != jpg_of(v1, rows1[url[replaced]]["key"])
    # nothing changed since: the same version again, and nothing read
    assert build_in(store, [("images", src)])["id"] == v2["id"]


class AuthHandler(http.server.BaseHTTPRequestHandler):
    """Serves a photo to requests with the right basic auth (/private/...) or signature query
    (/signed/...?X-Amz-Signature=...); 503 to everyone while `down`."""
    photos: dict = {}
    down = True
    hits: Counter = Counter()

    def do_GET(self):
        AuthHandler.hits[self.path.split("?")[0]] += 1
        ok_auth = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"alice:s3cret-pass").decode()
        ok_sig = self.path.endswith("?X-Amz-Signature=sig-secret-123")
        if AuthHandler.down:
            self.send_error(503)
        elif (self.path.startswith("/private/") and ok_auth) or (self.path.startswith("/signed/") and ok_sig):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            body = AuthHandler.photos[self.path.split("/")[1]]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(401)

    def log_message(self, *args):
        """Quiet test output."""


@pytest.fixture
def auth_server(tmp_path):
    photos = synth_images(tmp_path / "www", count=3, seed=83, person_fraction=1.0)
    AuthHandler.photos = {"private": photos[0].read_bytes(), "signed": photos[1].read_bytes()}
    AuthHandler.down = True
    AuthHandler.hits.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), AuthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", photos[2]
    server.shutdown()


def test_failed_credentialed_downloads_are_retried_from_their_list_row(tmp_path, ray_local, auth_server):
    host, local = auth_server
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(local, src / "local.jpg")
    listing = src / "urls.txt"
    listing.write_text(f"local.jpg\nhttp://alice:s3cret-pass@{host}/private/a.jpg\n"
                       f"http://{host}/signed/b.jpg?X-Amz-Signature=sig-secret-123\n")
    store = DatasetStore(tmp_path / "ds")
    http = HttpConfig(timeout_s=2, retries=0, backoff_s=0, allow_private_addresses=True)
    v1 = build_in(store, [("urls", listing)], http=http, max_attempts=3)
    rejects = {r["input"]: r for r in ledgers.ledger(store, v1).to_pylist() if r["status"] == "rejected"}
    assert set(rejects) == {f"http://{host}/private/a.jpg", f"http://{host}/signed/b.jpg?X-Amz-Signature=***"}
    assert all(r["stage"] == "fetch" and "503" in r["reason"] for r in rejects.values())
    # the list is unchanged (not listed again): the retry re-reads each failed row from it
    AuthHandler.down = False
    v2 = build_in(store, [("urls", listing)], http=http, max_attempts=3)
    rows = {r["input"]: r for r in ledgers.ledger(store, v2).to_pylist()}
    assert all(rows[name]["status"] == "kept" and rows[name]["attempts"] == 2 for name in rejects), \
        [(r["input"], r["status"], r["stage"], r["reason"], r["attempts"]) for r in rows.values()]
    assert v2["samples"] == 3 and v2["counts"]["rejected"] == 0
    assert AuthHandler.hits == {"/private/a.jpg": 2, "/signed/b.jpg": 2}
    # the credentials are nowhere in the store: not in a ledger, record, cache name or sample
    for path in Path(store.root).rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            if path.suffix == ".parquet":
                text = str(pq.read_table(path).to_pylist()).encode()
            elif path.suffix == ".tar":
                text = str(list(wds.WebDataset(str(path), shardshuffle=False))).encode() + text
            assert b"s3cret-pass" not in text and b"sig-secret-123" not in text, path


class ScanLog:
    """Directories this process listed (Python's audit events of os.scandir / os.listdir)."""
    active = None
    hooked = False

    def __init__(self):
        self.paths = []
        if not ScanLog.hooked:
            sys.addaudithook(ScanLog._hook)
            ScanLog.hooked = True

    @staticmethod
    def _hook(event, args):
        if ScanLog.active is not None and event in ("os.scandir", "os.listdir"):
            ScanLog.active.paths.append(os.fsdecode(args[0]) if args[0] is not None else ".")

    def __enter__(self):
        ScanLog.active = self
        return self

    def __exit__(self, *exc):
        ScanLog.active = None


def test_directories_and_url_lists_are_listed_in_split_tasks_not_by_the_driver(tmp_path, ray_local, monkeypatch):
    src = tmp_path / "src"
    flat = synth_images(src, count=10, seed=84, person_fraction=1.0)
    nested = synth_images(src / "a" / "b", count=3, seed=85, person_fraction=1.0)
    listed = synth_images(tmp_path / "listed", count=8, seed=86, person_fraction=1.0)
    url_list = tmp_path / "listed" / "urls.txt"
    url_list.write_text("".join(f"{p.name}\n" for p in listed))
    # a text list in byte ranges of ~40 bytes: several tasks, each line read by exactly one
    monkeypatch.setattr(listing_mod, "LIST_SPLIT_BYTES", 40)
    store = DatasetStore(tmp_path / "ds")
    with ScanLog() as driver:
        vid = run_build(cfg_for(store, [("images", src), ("urls", url_list)]), {})
    v = store.describe(store.resolve(vid))
    # every input listed once (a line read by two splits would be rejected as "listed twice");
    # the synthetic photos' own filter rejects (too small) are not the listing's business
    assert v["counts"]["inputs"] == 21 and v["counts"]["removed"] == 0
    assert all(r["stage"] == "filter" for r in ledgers.rejects(store, v).to_pylist()), ledgers.rejects(store, v).to_pylist()
    assert {r["input"] for r in ledgers.ledger(store, v).to_pylist()} == \
        {f"file://{p}" for p in flat + nested + listed}
    # the driver listed neither the source nor any directory under it
    assert not [p for p in driver.paths if p.startswith(str(src))], driver.paths
    assert len(set(keys_of(v))) == len(keys_of(v)) == v["counts"]["kept"] >= 18


def test_an_s3_prefix_is_listed_page_by_page_in_hash_shares(s3_server):
    """Past one ListObjectsV2 page (1000 keys): every object found by exactly one split, with its
    size and ETag, and sub-prefixes walked by the split they hash to."""
    import fsspec
    from dataprep.build_config import InputPolicy
    from dataprep.inputs.sources import list_directory_split
    fs = fsspec.filesystem("s3")
    fs.mkdir("flat-prefix")
    fs.pipe({f"flat-prefix/photos/p{i:05d}.jpg": b"x" * (i % 7 + 1) for i in range(1203)})
    fs.pipe({"flat-prefix/photos/sub/deep/q.jpg": b"q", "flat-prefix/photos/notes.txt": b"n"})
    found = []
    for k in range(3):
        items, rejects = list_directory_split("s3://flat-prefix/photos", InputPolicy(), (k, 3))
        assert not rejects
        found += items
    names = [i.input_id for i in found]
    assert len(names) == len(set(names)) == 1204
    assert "s3://flat-prefix/photos/sub/deep/q.jpg" in names
    p7 = next(i for i in found if i.input_id.endswith("p00007.jpg"))
    assert p7.size == 1 and p7.tag.strip('"') == hashlib.md5(b"x").hexdigest()
