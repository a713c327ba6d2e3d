"""Hostile dataset records and URL lists (issue 15, items 7 and 11): every URL a version record
holds (parts_url, part URLs, shard and index URLs) names a file inside its own dataset root, or
`pippo data show` and the training loader refuse it in one line without reading or fetching it;
IPv6-literal URLs are addresses (judged by the address policy), not fsspec chains; an input
refused at the source and listed twice keeps the reason it was refused for."""
import json

import pyarrow as pa
import pytest

from dataprep.build_config import BuildConfig, HttpConfig, InputPolicy, Source
from dataprep.build.listing import LISTING_SCHEMA
from dataprep.build.records import PartitionTask
from dataprep.build.partition_job import process_partition
from dataprep.inputs.photos import Rejected
from dataprep.inputs.safe_fetch import address_refusal
from dataprep.inputs.sources import fetch, is_chained, url_list_entry
from pippo_common.storage import fs_and_path
from support import VID, crafted_dataset, show  # shared with this file's other half


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
