"""Hostile dataset records and URL lists (issue 15, items 7 and 11): every URL a version record
holds (parts_url, part URLs, shard and index URLs) names a file inside its own dataset root, or
`pippo data show` and the training loader refuse it in one line without reading or fetching it;
IPv6-literal URLs are addresses (judged by the address policy), not fsspec chains; an input
refused at the source and listed twice keeps the reason it was refused for."""
import contextlib
import http.server
import io
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pippo_common.errors import DataError
from dataprep.store.ledger import PARTS_SCHEMA
from dataprep.loader import DataSource, LoaderConfig, TrainingLoader
from pipelines import cli

VID = "0123456789abcdef0123"


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):   # noqa: N802 (http.server's name)
        _Recorder.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


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


@pytest.mark.parametrize("where, url", [
    ("parts_url", "file://{outside}/parts.parquet"), ("parts_url", "{outside}/parts.parquet"),
    ("parts_url", "../outside/parts.parquet"), ("parts_url", "{web}/parts.parquet"),
    ("parts_url", "versions/../../outside/parts.parquet"), ("parts_url", "simplecache::{web}/parts.parquet"),
    ("part", "../outside/p0.json"), ("part", "{web}/p0.json"),
    ("shard", "file://{outside}/s0.tar"), ("index", "{web}/s0.index.parquet"),
])
def test_record_urls_outside_the_root_are_refused(tmp_path, web, where, url):
    url = url.format(outside=tmp_path / "outside", web=web)
    _Recorder.hits = []
    root = crafted_dataset(tmp_path, {where: url})
    code, out, err = show(f"{root}@{VID}")
    lines = [ln for ln in err.splitlines() if ln.startswith("pippo: error: ")]
    assert code == 2 and not out and "Traceback" not in err and len(lines) == 1, err
    assert "outside the dataset root" in lines[0] or "not a URL inside the dataset" in lines[0], lines[0]
    with pytest.raises(DataError, match="outside the dataset root|not a URL inside"):
        TrainingLoader([DataSource(f"{root}@{VID}")], "pretrain", LoaderConfig(num_workers=0))
    assert _Recorder.hits == []                      # nothing was fetched
