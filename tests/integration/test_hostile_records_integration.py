"""Hostile dataset records and URL lists (issue 15, items 7 and 11): every URL a version record
holds (parts_url, part URLs, shard and index URLs) names a file inside its own dataset root, or
`pippo data show` and the training loader refuse it in one line without reading or fetching it;
IPv6-literal URLs are addresses (judged by the address policy), not fsspec chains; an input
refused at the source and listed twice keeps the reason it was refused for."""
import http.server
import threading

import pytest

from pippo_common.errors import DataError
from dataprep.loader import DataSource, LoaderConfig, TrainingLoader
from support import VID, crafted_dataset, show  # shared with this file's other half


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
