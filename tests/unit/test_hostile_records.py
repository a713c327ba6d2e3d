"""Hostile dataset records and URL lists (issue 15, items 7 and 11): every URL a version record
holds (parts_url, part URLs, shard and index URLs) names a file inside its own dataset root, or
`pippo data show` and the training loader refuse it in one line without reading or fetching it;
IPv6-literal URLs are addresses (judged by the address policy), not fsspec chains; an input
refused at the source and listed twice keeps the reason it was refused for."""
import contextlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.build_config import BuildConfig, HttpConfig, InputPolicy, Source
from dataprep.store.ledger import PARTS_SCHEMA
from dataprep.build.listing import LISTING_SCHEMA
from dataprep.build.records import PartitionTask
from dataprep.build.partition_job import process_partition
from dataprep.inputs.photos import Rejected
from dataprep.inputs.safe_fetch import address_refusal
from dataprep.inputs.sources import fetch, is_chained, url_list_entry
from pippo_common.storage import fs_and_path
from pipelines import cli

VID = "0123456789abcdef0123"


def crafted_dataset(tmp_path, hostile: dict) -> str:
    """A dataset with one version whose record, parts list and part record are valid, except the
    URLs named in `hostile` ({"parts_url" | "part" | "ledger_url" | "shard" | "index": URL}).
    Valid files also lie outside the root, so a reader that followed a URL there would succeed."""
    root, outside = tmp_path / "ds", tmp_path / "outside"
    for d in (root / "versions" / VID, root / "parts" / "r", root / "shards" / "r", outside):
        d.mkdir(parents=True, exist_ok=True)
    (root / ".pippo-dataset").write_text(json.dumps({"format": 2}))
    index = pa.table({"key": ["k0"], "kind": ["image"]})
    for base in (root / "shards" / "r", outside):
        pq.write_table(index, base / "s0.index.parquet")
        (base / "s0.tar").write_bytes(b"\0" * 1024)
    ledger = pa.table({"input": ["a.jpg"], "status": ["rejected"], "stage": ["decode"], "reason": ["bad"]})
    shard = {"url": hostile.get("shard", "shards/r/s0.tar"), "index_url": hostile.get("index", "shards/r/s0.index.parquet"),
             "samples": 1, "bytes": 1024, "sha256": "0" * 64, "kind": "image"}
    part = {"shards": [shard], "drops": [], "ledger_url": hostile.get("ledger_url", "parts/r/p0.ledger.parquet")}
    for base in (root / "parts" / "r", outside):
        pq.write_table(ledger, base / "p0.ledger.parquet")
        (base / "p0.json").write_text(json.dumps(part))
    parts = pa.Table.from_pylist([{"part": "p0", "partition": 0, "kind": "ledger", "digest": "d",
                                   "url": hostile.get("part", "parts/r/p0.json"),
                                   "ledger_url": "parts/r/p0.ledger.parquet"}], schema=PARTS_SCHEMA)
    for base in (root / "versions" / VID, outside):
        pq.write_table(parts, base / "parts.parquet")
    record = {"id": VID, "created": "2026-01-01T00:00:00Z", "format": 2, "parent": None, "recipe": "r",
              "samples": 1, "rejected": 1, "partitions": 1, "counts": {}, "stats": {},
              "parts_url": hostile.get("parts_url", f"versions/{VID}/parts.parquet"),
              "stats_url": f"versions/{VID}/stats.json", "preview_url": f"versions/{VID}/preview.png"}
    (root / "versions" / f"{VID}.json").write_text(json.dumps(record))
    return str(root)


def show(ref: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["data", "show", ref, "--json"])
    return code, out.getvalue(), err.getvalue()


def test_a_clean_crafted_record_shows(tmp_path):
    """The crafted dataset itself is readable: the refusals below are the hostile URLs alone."""
    root = crafted_dataset(tmp_path, {})
    code, out, err = show(f"{root}@{VID}")
    assert code == 0, err
    assert json.loads(out)["shards"][0]["url"] == f"file://{root}/shards/r/s0.tar"


def test_ipv6_literal_urls_are_addresses_not_chains(tmp_path):
    listing = tmp_path / "list.txt"
    fs, path = fs_and_path(str(listing))
    policy = InputPolicy()
    for url in ("http://[2001:db8::1]/a.jpg", "https://[2606:4700:4700::1111]:8443/a.jpg",
                "http://user:pw@[::ffff:10.0.0.1]/a.jpg"):
        assert not is_chained(url)
        assert url_list_entry(url, fs, path, policy) == (url, None)
    assert address_refusal("2606:4700:4700::1111") is None          # public: fetched like any host
    for url, why in (("http://[2001:db8::1]/a.jpg", "private"), ("http://[::1]:9/a.jpg", "loopback"),
                     ("http://[::ffff:169.254.169.254]/a.jpg", "link-local")):
        with pytest.raises(Rejected) as info:
            fetch(url, HttpConfig(retries=0))
        assert why in info.value.reason and "chained" not in info.value.reason, info.value.reason
    # real chains are still chains, also behind an IPv6-looking part
    for url in ("simplecache::http://[::1]/a.jpg", "zip://[::1]/a::file:///etc/passwd", "http://[::1]/a::b"):
        assert is_chained(url)
        assert url_list_entry(url, fs, path, policy)[1] == "chained URLs (::) are not allowed"


def test_a_refused_input_listed_twice_keeps_its_reason(tmp_path):
    reason = "scheme ftp:// not allowed (allowed: http, https, local paths)"
    rows = [{"input_id": "ftp://h/a.jpg", "kind": "image", "uri": "ftp://h/a.jpg", "frame": -1, "member": "",
             "size": -1, "listing": "l", "stage": "source", "reason": reason}] * 2
    rows += [{"input_id": "file:///x/b.jpg", "kind": "image", "uri": "file:///x/b.jpg", "frame": -1, "member": "",
              "size": -1, "listing": "l", "stage": "", "reason": ""}] * 2
    cfg = BuildConfig(dataset=str(tmp_path / "ds"), sources=[Source("urls", str(tmp_path / "l.txt"))])
    task = PartitionTask(0, 1, 1, str(tmp_path / "ds"), "r", [], [], dry_run=True)
    plan, *_ = process_partition(task, cfg, pa.Table.from_pylist(rows, schema=LISTING_SCHEMA))
    by_input: dict = {}
    for row in plan.decided:                      # ledger replay: the last row of an input wins
        by_input[row["input"]] = row["reason"]
    assert by_input["ftp://h/a.jpg"] == reason
    assert by_input["file:///x/b.jpg"] == "listed twice"     # the read of the first listing follows it
    assert plan.todo == 1
