"""Build sources beyond directories: URL lists over flaky HTTP, existing WebDataset tars, and a
second real S3 server (SeaweedFS) through the CLI."""
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support import free_port, wait_http
import dataprep.store.ledger as ledgers
from dataprep.build_config import HttpConfig, PhotoFilters
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_images
from support import build, samples_of


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; 'flaky_*' fail twice with 503, 'dead_*' always 500, 'slow_*' stall
    once past the client's timeout."""
    hits: Counter = Counter()
    revived = False           # when True, 'dead_*' recovers

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        FlakyHandler.hits[name] += 1
        n = FlakyHandler.hits[name]
        if name.startswith("flaky_") and n <= 2:
            self.send_error(503)
            return
        if name.startswith("dead_") and not FlakyHandler.revived:
            self.send_error(500)
            return
        if name.startswith("slow_") and n == 1:
            time.sleep(1.5)
        super().do_GET()

    def log_message(self, *args):
        """Keep the test output quiet (the default logs every request to stderr)."""


@pytest.fixture
def http_photos(tmp_path):
    root = tmp_path / "www"
    paths = synth_images(root, count=6, seed=21, person_fraction=1.0)
    names = []
    for k, p in enumerate(paths):
        prefix = ["ok", "ok", "flaky", "dead", "slow", "ok"][k]
        target = p.with_name(f"{prefix}_{p.name}")
        p.rename(target)
        names.append(target.name)
    handler = lambda *a, **kw: FlakyHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    FlakyHandler.hits.clear()
    FlakyHandler.revived = False
    yield base, names
    server.shutdown()


@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet"])
def test_url_lists_with_retries_and_timeouts(http_photos, tmp_path, ray_local, fmt):
    base, names = http_photos
    urls = [f"{base}/{n}" for n in names] + [f"{base}/missing.jpg"]
    listing = tmp_path / f"urls.{fmt}"
    if fmt == "txt":
        listing.write_text("# photos\n" + "\n".join(urls) + "\n")
    elif fmt == "csv":
        listing.write_text("url,caption\n" + "\n".join(f"{u},a person" for u in urls) + "\n")
    else:
        pq.write_table(pa.table({"url": urls}), listing)
    store = DatasetStore(tmp_path / "ds")
    # the test server is on 127.0.0.1: loopback must be allowed explicitly
    vid = build(store.uri, [("urls", listing)], resolution=64,
                http=HttpConfig(timeout_s=0.5, retries=3, backoff_s=0.05, allow_private_addresses=True))
    v = store.describe(store.resolve(vid))
    rejects = {r["input"].rsplit("/", 1)[-1]: r for r in ledgers.rejects(store, v).to_pylist()}
    assert set(rejects) == {n for n in names if n.startswith("dead_")} | {"missing.jpg"}
    assert all(r["stage"] == "fetch" for r in rejects.values())
    assert "HTTP 500" in next(r for n, r in rejects.items() if n.startswith("dead_"))["reason"]
    assert "HTTP 404" in rejects["missing.jpg"]["reason"]
    assert v["samples"] == 5                          # ok ×3, flaky and slow after retries
    flaky = next(n for n in names if n.startswith("flaky_"))
    assert FlakyHandler.hits[flaky] >= 3
    # downloads are cached in the store: a rebuild (new recipe) downloads nothing again
    before = sum(FlakyHandler.hits.values())
    build(store.uri, [("urls", listing)], resolution=32,
          http=HttpConfig(timeout_s=0.5, retries=0, backoff_s=0, allow_private_addresses=True))
    dead_and_missing = 2
    assert sum(FlakyHandler.hits.values()) - before == dead_and_missing
    # an incremental build retries inputs that failed to download; the rest is reused
    FlakyHandler.revived = True
    again = store.describe(store.resolve(build(store.uri, [("urls", listing)], resolution=32,
                                http=HttpConfig(timeout_s=0.5, retries=0, backoff_s=0,
                                                                 allow_private_addresses=True))))
    rejects = [r["input"].rsplit("/", 1)[-1] for r in ledgers.rejects(store, again).to_pylist()]
    assert again["samples"] == 6 and rejects == ["missing.jpg"] and again["stats"]["new_samples"] == 1


def test_existing_webdataset_tars_as_a_source(tmp_path, ray_local):
    synth_images(tmp_path / "photos", count=5, seed=31, person_fraction=1.0)
    first = DatasetStore(tmp_path / "first")
    v1 = first.describe(first.resolve(build(first.uri, [("images", tmp_path / "photos")], resolution=64)))
    second = DatasetStore(tmp_path / "second")
    shard_dir = Path(v1["shards"][0]["url"].removeprefix("file://")).parent
    (shard_dir / "junk.tar").write_bytes(b"not a tar at all" * 64)
    # the first version's 64 px photos pass a 32 px minimum side
    v2 = second.describe(second.resolve(build(second.uri, [("webdataset", shard_dir)], resolution=32,
                                              filters=PhotoFilters(min_side=32))))
    assert v2["samples"] == 5 and v2["rejected"] == 1
    reject = ledgers.rejects(second, v2).to_pylist()[0]
    assert reject["input"].endswith("junk.tar") and "not a readable tar" in reject["reason"]
    for s in samples_of(v2).values():
        meta = json.loads(s["json"])
        assert meta["source"].split("#")[0].endswith(".tar") and (meta["width"], meta["height"]) == (32, 32)


KEY, SECRET = "pippo-test", "pippo-test-secret"


@pytest.fixture
def seaweed_s3(tmp_path):
    """SeaweedFS (`weed mini`): a second, real S3 implementation on 127.0.0.1."""
    exe = Path(sys.executable).with_name("weed")
    port = free_port()
    data = tmp_path / "weed"
    data.mkdir()
    identities = {"identities": [{"name": "pippo", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (tmp_path / "s3.json").write_text(json.dumps(identities))
    proc = subprocess.Popen([str(exe), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.port={port}", f"-s3.config={tmp_path / 's3.json'}", "-bucket=weed-bucket",
                             "-admin.ui=false", f"-master.port={free_port()}", f"-volume.port={free_port()}",
                             f"-filer.port={free_port()}", f"-webdav.port={free_port()}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, timeout=60)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_build_against_seaweedfs(tmp_path, seaweed_s3):
    import fsspec
    env = {**os.environ, "AWS_ENDPOINT_URL": seaweed_s3, "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    fs = fsspec.filesystem("s3", endpoint_url=seaweed_s3, key=KEY, secret=SECRET)
    paths = synth_images(tmp_path / "photos", count=4, seed=41, person_fraction=1.0)
    deadline = time.time() + 30
    while True:          # the S3 gateway may answer before its filer is ready
        try:
            fs.put_file(str(paths[0]), f"weed-bucket/raw/{paths[0].name}")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    for p in paths[1:]:
        fs.put_file(str(p), f"weed-bucket/raw/{p.name}")
    cfg = tmp_path / "build.yaml"
    cfg.write_text(json.dumps({"dataset": "s3://weed-bucket/ds", "resolution": 64,
                               "sources": [{"kind": "images", "uri": "s3://weed-bucket/raw"}]}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipelines.cli", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    proc = run("data", "build", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    vid = proc.stdout.strip().splitlines()[-1]
    record = json.loads(run("data", "show", f"s3://weed-bucket/ds@{vid}", "--json").stdout)
    assert record["id"] == vid and record["samples"] == 4
    assert all(s["url"].startswith("s3://weed-bucket/ds/shards/") for s in record["shards"])
    # the same build again finds the version already committed (conditional create on SeaweedFS)
    again = run("data", "build", str(cfg))
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == vid
    store = DatasetStore("s3://weed-bucket/ds", endpoint_url=seaweed_s3, key=KEY, secret=SECRET)
    assert store.create_exclusive(store.path("versions", f"{vid}.json"), b"{}") is False
    assert json.loads(fs.cat(f"weed-bucket/ds/versions/{vid}.json"))["id"] == vid
