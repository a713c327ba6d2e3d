"""Hostile and careless inputs (issue 10, items 1-5): no decoder we did not mean, no request to a
private address, no read outside the sources, no unbounded read or wait, no silent loss.
Every hostile input is built here; functions are called directly (no Ray) except one CLI build."""
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import free_port
from dataprep.inputs import safe_fetch
import dataprep.store.ledger as ledgers
from dataprep.build.partition_job import cached_fetch
from dataprep.build_config import BuildConfig, HttpConfig, InputPolicy, Source
from dataprep.inputs.photos import Rejected
from dataprep.inputs.sources import OUTSIDE
from dataprep.studio.synth import synth_image
from support import jpeg, saved, EPS  # shared with this file's other half



# ---- 1. only the formats we mean ---------------------------------------------------------------


# ---- 2. server-side request forgery ------------------------------------------------------------

CREDENTIALS = b'{"AccessKeyId": "ASIA-HOSTILE", "SecretAccessKey": "s3cr3t"}'


class Hostile(http.server.BaseHTTPRequestHandler):
    hits: list = []
    secret_port = other_port = 0

    def do_GET(self):
        Hostile.hits.append((self.server.server_address[0], self.path))
        path = self.path
        if path == "/photo.jpg":
            self._send(200, jpeg())
        elif path == "/secret":
            self._send(200, CREDENTIALS, "application/json")
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/role")
        elif path == "/to-loopback":
            self._redirect(f"http://127.0.0.1:{Hostile.secret_port}/secret")
        elif path == "/to-localhost":
            self._redirect(f"http://localhost:{Hostile.secret_port}/secret")
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/to-photo":
            self._redirect("/photo.jpg")
        elif path == "/auth":
            ok = self.headers.get("Authorization") == "Basic dTpwQHNz"          # u:p@ss
            self._send(200 if ok else 401, jpeg() if ok else b"")
        elif path == "/to-auth-same":
            self._redirect(f"http://127.0.0.2:{self.server.server_address[1]}/auth")
        elif path == "/to-auth-other":
            self._redirect(f"http://127.0.0.3:{Hostile.other_port}/auth")
        elif path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path == "/huge-streamed":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            self.close_connection = True
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif path == "/busy":
            if sum(p == "/busy" for _, p in Hostile.hits) == 1:
                self.send_response(503)
                self.send_header("Retry-After", "21600")             # six hours
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(200, jpeg())
        else:
            self._send(404, b"")

    def _send(self, status, body, ctype="image/jpeg"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile_web(monkeypatch):
    """The 'public' servers on 127.0.0.2 and .3 (the test treats those addresses as public) and
    the 'internal' one on 127.0.0.1, which must never be reached with default settings."""
    servers = []
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        srv = http.server.ThreadingHTTPServer((host, free_port()), Hostile)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    Hostile.hits = []
    Hostile.secret_port = servers[0].server_address[1]
    Hostile.other_port = servers[2].server_address[1]
    real = safe_fetch.address_refusal
    monkeypatch.setattr(safe_fetch, "address_refusal",
                        lambda a: None if a in ("127.0.0.2", "127.0.0.3") else real(a))
    yield f"http://127.0.0.2:{servers[1].server_address[1]}"
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_redirects_to_private_addresses_are_refused_and_nothing_is_cached(hostile_web, tmp_path):
    http = HttpConfig(timeout_s=5, retries=1, backoff_s=0)
    limit = InputPolicy().max_bytes
    assert safe_fetch.http_get(f"{hostile_web}/to-photo", http, limit) == jpeg()   # redirects work
    for path, why in [("/to-metadata", "169.254.169.254 of 169.254.169.254 is link-local"),
                      ("/to-loopback", "127.0.0.1 of 127.0.0.1 is loopback"),
                      ("/to-localhost", "of localhost is loopback"),
                      ("/to-file", "non-http(s)"), ("/loop", "more than 5 redirects")]:
        start = time.monotonic()
        with pytest.raises(Rejected, match="refused|redirects") as info:
            safe_fetch.http_get(hostile_web + path, http, limit)
        assert why in info.value.reason and info.value.stage == "fetch"
        assert time.monotonic() - start < 3               # refused, not timed out
    with pytest.raises(Rejected, match="loopback"):       # the first URL is checked the same way
        safe_fetch.http_get(f"http://127.0.0.1:{Hostile.secret_port}/secret", http, limit)
    assert not [h for h in Hostile.hits if h[0] == "127.0.0.1"]      # the internal server: never reached
    # the build's cached fetch: a body that is no image (a credentials JSON at an allowed address)
    # is rejected and never cached; a photo is
    store = tmp_path / "ds"
    cfg = BuildConfig(dataset=str(store), sources=[Source("urls", "x")], http=http)
    rows = {}
    for path in ("/to-metadata", "/to-loopback", "/secret", "/photo.jpg"):
        try:
            cached_fetch(hostile_web + path, cfg, str(store))
            rows[path] = {"stage": "", "reason": ""}
        except Rejected as r:
            rows[path] = {"stage": r.stage, "reason": r.reason}
    assert rows["/photo.jpg"]["stage"] == ""
    assert rows["/secret"]["stage"] == "decode" and "allowed" in rows["/secret"]["reason"]
    assert rows["/to-metadata"]["stage"] == rows["/to-loopback"]["stage"] == "fetch"
    cached = [p for p in store.rglob("*") if p.is_file()]
    assert len(cached) == 1 and cached[0].read_bytes() == jpeg()
    assert not any(b"s3cr3t" in p.read_bytes() for p in cached)
    # with the switch on (an internal mirror), private addresses are fetched
    internal = HttpConfig(timeout_s=5, retries=0, allow_private_addresses=True)
    assert safe_fetch.http_get(f"{hostile_web}/to-loopback", internal, limit) == CREDENTIALS


def test_url_credentials_go_to_their_own_host_only(hostile_web):
    http = HttpConfig(timeout_s=5, retries=0)
    with_creds = hostile_web.replace("http://", "http://u:p%40ss@")
    assert safe_fetch.http_get(f"{with_creds}/auth", http, 10**6) == jpeg()
    assert safe_fetch.http_get(f"{with_creds}/to-auth-same", http, 10**6) == jpeg()
    with pytest.raises(Rejected, match="HTTP 401"):       # never forwarded to another origin
        safe_fetch.http_get(f"{with_creds}/to-auth-other", http, 10**6)


def test_bodies_are_capped_and_fetches_end_at_the_deadline(hostile_web):
    http = HttpConfig(timeout_s=1.0, retries=2, backoff_s=0, max_retry_wait_s=0.2)
    with pytest.raises(Rejected, match="exceeds inputs.max_bytes"):
        safe_fetch.http_get(f"{hostile_web}/huge-declared", http, 100_000)
    with pytest.raises(Rejected, match="exceeds inputs.max_bytes"):
        safe_fetch.http_get(f"{hostile_web}/huge-streamed", http, 100_000)
    start = time.monotonic()          # a byte every 0.1 s: each read is quick, the whole is not
    with pytest.raises(Rejected, match="not complete within timeout_s"):
        safe_fetch.http_get(f"{hostile_web}/trickle", http, 100_000)
    assert time.monotonic() - start < 2.0
    start = time.monotonic()          # Retry-After: six hours, honoured only up to max_retry_wait_s
    assert safe_fetch.http_get(f"{hostile_web}/busy", http, 10**6) == jpeg()
    assert time.monotonic() - start < 2.0


# ---- 3. reads outside the sources --------------------------------------------------------------


# ---- 4. memory and time bombs ------------------------------------------------------------------


def add(tar, name, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


# ---- 5. WebDataset sources lose nothing silently -----------------------------------------------


# ---- a bad-input corpus through `pippo data build` ---------------------------------------------

def test_bad_input_corpus_build_conserves_and_stays_inside(tmp_path):
    root = tmp_path / "in"
    photos, wds, lists, outside = root / "photos", root / "wds", root / "lists", tmp_path / "outside"
    for d in (photos, wds, lists, outside):
        d.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for k in range(3):
        Image.fromarray(synth_image(rng)).save(photos / f"good{k}.jpg", quality=90)
    (photos / "postscript.jpg").write_bytes(EPS)
    (photos / "sgi.jpg").write_bytes(saved("SGI"))
    os.mkfifo(photos / "fifo.jpg")
    (outside / "secret.jpg").write_bytes((photos / "good0.jpg").read_bytes()[:-2] + b"\xff\xd9")
    os.symlink(outside / "secret.jpg", photos / "stolen.jpg")
    os.symlink("/dev/zero", photos / "zero.jpg")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "s0.jpg", (photos / "good1.jpg").read_bytes() + b"\0")
        add(tar, "s1.jpg", linkname="/etc/passwd", type=tarfile.SYMTYPE)
        add(tar, "s2.jpg", EPS)
    (wds / "a.tar").write_bytes(buf.getvalue())
    (wds / "b.tgz").write_bytes(b"\x1f\x8b" + b"\0" * 64)
    Image.fromarray(synth_image(rng)).save(lists / "listed.jpg", quality=90)
    (lists / "urls.txt").write_text(
        f"listed.jpg\nfile:///etc/passwd\n../../outside/secret.jpg\n"
        f"zip://secret.jpg::file://{outside}/x.zip\nmemory://x.jpg\nftp://example.com/y.jpg\n")
    expected_inputs = 8 + 4 + 6            # photos (incl. 3 refused links/FIFO), tar rows + tgz, list entries
    store = tmp_path / "store"
    cfg = tmp_path / "build.yaml"
    cfg.write_text(json.dumps({"dataset": str(store), "resolution": 32, "plucker_stride": 8,
                               "filters": {"min_side": 32},
                               "sources": [{"kind": "images", "uri": str(photos)},
                                           {"kind": "webdataset", "uri": str(wds)},
                                           {"kind": "urls", "uri": str(lists / "urls.txt")}]}))
    before = {p for p in tmp_path.rglob("*") if p != store}
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "build", str(cfg)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vid = proc.stdout.strip().splitlines()[-1]
    from dataprep.store.core import DatasetStore
    ds = DatasetStore(str(store))
    v = ds.resolve(vid)
    inputs = ledgers.ledger(ds, v).to_pylist()
    rejects = ledgers.rejects(ds, v).to_pylist()
    assert len(inputs) == expected_inputs == v["samples"] + v["rejected"]
    assert v["samples"] == 5 and len(rejects) == v["rejected"]     # good0-2, s0, listed.jpg
    assert all(r["reason"] and "\n" not in r["reason"] for r in rejects)
    by_name = {r["input"].rsplit("/", 1)[-1]: r for r in rejects}
    assert "format not allowed (signature of EPS" in by_name["postscript.jpg"]["reason"]
    assert by_name["fifo.jpg"]["reason"].startswith("not a regular file")
    assert by_name["stolen.jpg"]["reason"] == by_name["zero.jpg"]["reason"] == OUTSIDE
    assert by_name["secret.jpg"]["reason"] == by_name["passwd"]["reason"] == OUTSIDE
    assert "link" in by_name["a.tar#s1"]["reason"] and "EPS" in by_name["a.tar#s2"]["reason"]
    assert "compressed tars" in by_name["b.tgz"]["reason"]
    # nothing written outside the store (the config and the inputs are all that was there before)
    after = {p for p in tmp_path.rglob("*") if store not in p.parents and p != store}
    assert after == before
    # a source that yields nothing: exit 2, one line
    cfg.write_text(json.dumps({"dataset": str(tmp_path / "store2"),
                               "sources": [{"kind": "webdataset", "uri": str(wds / "b.tgz")}]}))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "build", str(cfg)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "yields no inputs" in proc.stderr
