"""Hostile and careless inputs (issue 10, items 1-5): no decoder we did not mean, no request to a
private address, no read outside the sources, no unbounded read or wait, no silent loss.
Every hostile input is built here; functions are called directly (no Ray) except one CLI build."""
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from dataprep import safe_fetch
from dataprep.partition_job import cached_fetch
from dataprep.build_config import BuildConfig, HttpConfig, InputPolicy, Source
from dataprep.capture import Capture, decode_image
from dataprep.errors import CaptureError
from pippo_common.errors import DataError
from dataprep.photos import Rejected, decode_photo
from dataprep.sources import OUTSIDE, InputItem, enumerate_source, fetch, read_tar, tar_rows
from dataprep.synth import synth_capture, synth_image


def jpeg(size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def saved(fmt, mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), 128 if mode in ("L", "F") else (10, 20, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"/Helvetica findfont 12 scalefont setfont 0 0 moveto (pwned) show showpage\n%%EOF\n")


def hostile_images() -> dict[str, bytes]:
    """Formats Pillow would identify from the bytes, each named .jpg by the attacker."""
    return {"EPS": EPS, "SGI": saved("SGI"), "DDS": saved("DDS", "RGBA"), "QOI": saved("QOI"),
            "TGA": saved("TGA"), "IM": saved("IM"), "SPIDER": saved("SPIDER", "F")}


# ---- 1. only the formats we mean ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:IM image format is deprecated")
def test_disallowed_formats_never_reach_a_decoder(monkeypatch):
    hostile = hostile_images()
    for fmt, data in hostile.items():
        # the unrestricted Pillow does pick these plugins from the bytes (what made this a hole)
        assert Image.open(io.BytesIO(data)).format == fmt
    calls = []
    for fmt in hostile:
        factory, accept = Image.OPEN[fmt]

        def spy(fp, filename=None, _fmt=fmt, _factory=factory):
            calls.append(_fmt)
            return _factory(fp, filename)
        monkeypatch.setitem(Image.OPEN, fmt, (spy, accept))
    for fmt, data in hostile.items():
        with pytest.raises(Rejected) as info:
            decode_photo(data, 10**8)
        assert info.value.stage == "decode" and "\n" not in info.value.reason
        assert info.value.reason.startswith("format not allowed ("), info.value.reason
        with pytest.raises(CaptureError, match="format not allowed"):
            decode_image(data, "cap: camera 1 frame 0")
    assert calls == []                                         # no hostile plugin was ever called
    assert "format not allowed (signature of EPS" in _reason(lambda: decode_photo(EPS, 10**8))
    # the allowed formats still decode; capture frames are narrower than photos
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode_photo(saved(fmt), 10**8).rgb.shape == (16, 16, 3)
    with pytest.raises(CaptureError, match="signature of WEBP"):
        decode_image(saved("WEBP"), "cap: camera 1 frame 0")
    assert decode_image(saved("PNG"), "frame").shape == (16, 16, 3)


def _reason(fn) -> str:
    try:
        fn()
    except Rejected as exc:
        return exc.reason
    raise AssertionError("not rejected")


def test_eval_views_decode_only_photo_formats(tmp_path):
    from pippo_common.errors import UserError
    from pipelines.model_commands import read_views
    cam = {"K": np.eye(3).tolist(), "R": np.eye(3).tolist(), "t": [0, 0, 1], "height": 16, "width": 16}
    (tmp_path / "cameras.json").write_text(json.dumps({"views": [cam, cam]}))
    (tmp_path / "view00.png").write_bytes(saved("PNG"))
    (tmp_path / "view01.png").write_bytes(EPS)
    with pytest.raises(UserError, match=r"format not allowed \(signature of EPS"):
        read_views(tmp_path)


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


def test_address_policy():
    refused = {"127.0.0.1": "loopback", "::1": "loopback", "169.254.169.254": "link-local",
               "fe80::1": "link-local", "10.1.2.3": "private", "192.168.0.1": "private",
               "172.16.0.1": "private", "fd00::1": "private", "224.0.0.1": "multicast",
               "ff02::1": "multicast", "0.0.0.0": "unspecified", "::": "unspecified",
               "240.0.0.1": "reserved", "100.64.0.1": "not globally routable",
               "::ffff:169.254.169.254": "link-local", "2002:7f00:1::": "loopback",
               "64:ff9b::a9fe:a9fe": "link-local"}
    for address, why in refused.items():
        assert why in (safe_fetch.address_refusal(address) or ""), address
    for address in ("93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"):
        assert safe_fetch.address_refusal(address) is None, address


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

def test_url_lists_read_only_allowed_schemes_and_local_paths_inside(tmp_path):
    lists, outside = tmp_path / "lists", tmp_path / "outside"
    (lists / "photos").mkdir(parents=True)
    outside.mkdir()
    (lists / "photos" / "ok.jpg").write_bytes(jpeg())
    (outside / "private.jpg").write_bytes(jpeg(seed=1))
    os.symlink(outside / "private.jpg", lists / "link.jpg")
    os.symlink(outside / "nothing-here.jpg", lists / "dangling.jpg")
    entries = {
        "photos/ok.jpg": None, f"file://{lists}/photos/ok.jpg": None, "photos/missing.jpg": None,
        "HTTPS://example.com/a.jpg": None,
        "file:///etc/passwd": OUTSIDE, "../../../../../../etc/passwd": OUTSIDE, "/etc/passwd": OUTSIDE,
        "../outside/private.jpg": OUTSIDE, "../outside/nothing-here.jpg": OUTSIDE,
        "link.jpg": OUTSIDE, "dangling.jpg": OUTSIDE,
        f"zip://x.jpg::file://{outside}/a.zip": "chained", f"simplecache::file://{outside}/private.jpg": "chained",
        "memory://x.jpg": "scheme memory:// not allowed", "ftp://example.com/x.jpg": "scheme ftp:// not allowed",
        "s3://bucket/x.jpg": "scheme s3:// not allowed",
    }
    listing = lists / "urls.txt"
    listing.write_text("\n".join(entries) + "\n")
    items, rejects = enumerate_source(Source("urls", str(listing)))
    assert len(items) + len(rejects) == len(entries)
    assert sorted(i.input_id.removeprefix(f"file://{lists}/") for i in items) == [
        "https://example.com/a.jpg", "photos/missing.jpg", "photos/ok.jpg", "photos/ok.jpg"]
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r["input_id"])
        assert r["stage"] == "source" and "\n" not in r["reason"]
    # an outside file that exists and one that does not: the same reason, nothing read
    assert len(by_reason[OUTSIDE]) == 7
    assert sum("chained" in r for r in by_reason) == 1 and len(by_reason["chained URLs (::) are not allowed"]) == 2
    for scheme in ("memory", "ftp", "s3"):
        assert any(f"scheme {scheme}:// not allowed" in r for r in by_reason)
    # inside: a missing file is just "file not found" at fetch time
    missing = next(i for i in items if i.input_id.endswith("missing.jpg"))
    assert _reason(lambda: fetch(missing.uri, HttpConfig())) == "file not found"
    # configured roots and schemes widen the policy
    policy = InputPolicy(local_roots=[str(outside)], allowed_schemes=["http", "https", "s3"])
    items, rejects = enumerate_source(Source("urls", str(listing)), policy)
    allowed = {i.input_id for i in items}
    assert f"file://{outside}/private.jpg" in allowed and "s3://bucket/x.jpg" in allowed
    assert f"file://{lists}/link.jpg" in allowed and len(rejects) == 7


def test_symlinks_out_of_photo_and_webdataset_sources_are_refused(tmp_path):
    src, outside = tmp_path / "photos", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    (src / "ok.jpg").write_bytes(jpeg())
    (outside / "x.jpg").write_bytes(jpeg(seed=2))
    os.symlink(outside / "x.jpg", src / "out.jpg")
    os.symlink("/dev/zero", src / "zero.jpg")
    os.symlink("ok.jpg", src / "inside.jpg")               # a link inside the source is fine
    items, rejects = enumerate_source(Source("images", str(src)))
    assert sorted(Path(i.uri).name for i in items) == ["inside.jpg", "ok.jpg"]
    assert sorted((Path(r["input_id"]).name, r["reason"]) for r in rejects) == [
        ("out.jpg", OUTSIDE), ("zero.jpg", OUTSIDE)]


def test_capture_camera_ids_and_symlinked_zips_stay_inside(tmp_path):
    cap = synth_capture(tmp_path / "caps" / "cap", cameras=3, frames=1, height=32, width=24, seed=3)
    calib = json.loads((cap / "camera_calibration.json").read_text())
    ids = [c["cameraId"] for c in calib["KRT"]]
    outside = tmp_path / "outside"
    (outside / "image").mkdir(parents=True)
    # a camera whose id walks out of the capture, with a zip waiting for it out there
    calib["KRT"][0]["cameraId"] = "/../../outside/cam"
    (tmp_path / "outside" / "cam.zip").write_bytes((cap / "image" / f"cam{ids[0]}.zip").read_bytes())
    (cap / "camera_calibration.json").write_text(json.dumps(calib))
    # a camera whose zip is a symlink to a zip outside; one whose symlink points at nothing
    os.replace(cap / "image" / f"cam{ids[1]}.zip", outside / "image" / "stolen.zip")
    os.symlink(outside / "image" / "stolen.zip", cap / "image" / f"cam{ids[1]}.zip")
    os.replace(cap / "image" / f"cam{ids[2]}.zip", outside / "moved.zip")
    os.symlink(outside / "absent.zip", cap / "image" / f"cam{ids[2]}.zip")
    c = Capture(str(cap), strict=False)
    assert list(c.cameras) == ids[1:]
    reason = c.invalid_cameras["/../../outside/cam"]
    assert "not a plain name" in reason and "\n" not in reason
    with pytest.raises(CaptureError) as present:
        c.image(ids[1], c.frames[0])
    with pytest.raises(CaptureError) as absent:
        c.image(ids[2], c.frames[0])
    assert "points outside the capture" in str(present.value)
    assert str(present.value).replace(ids[1], "ID") == str(absent.value).replace(ids[2], "ID")
    # a symlinked calibration is refused as a whole capture, in one line
    os.replace(cap / "camera_calibration.json", outside / "calib.json")
    os.symlink(outside / "calib.json", cap / "camera_calibration.json")
    with pytest.raises(CaptureError, match="points outside the capture"):
        Capture(str(cap), strict=False)


# ---- 4. memory and time bombs ------------------------------------------------------------------

def test_local_reads_are_regular_files_within_the_cap(tmp_path):
    fifo = tmp_path / "blocks.jpg"
    os.mkfifo(fifo)
    outcome = {}
    read = lambda: outcome.setdefault("r", _reason(lambda: fetch(f"file://{fifo}", HttpConfig())))  # noqa: E731
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "a FIFO blocked the read"
    assert outcome["r"].startswith("not a regular file")
    assert _reason(lambda: fetch("file:///dev/zero", HttpConfig())).startswith("not a regular file")
    sock_path = tmp_path / "s.jpg"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert _reason(lambda: fetch(f"file://{sock_path}", HttpConfig())).startswith("not a regular file")
    (tmp_path / "big.jpg").write_bytes(jpeg() + b"\0" * 5000)
    assert "exceed inputs.max_bytes" in _reason(lambda: fetch(f"file://{tmp_path}/big.jpg", HttpConfig(), 1000))
    # /dev/zero listed explicitly under a configured root is still not read
    listing = tmp_path / "urls.txt"
    listing.write_text("/dev/zero\n")
    items, _ = enumerate_source(Source("urls", str(listing)), InputPolicy(local_roots=["/dev"]))
    assert _reason(lambda: fetch(items[0].uri, HttpConfig())).startswith("not a regular file")


def sparse_member(name: str, realsize: int) -> bytes:
    """A GNU sparse member header (type 'S') claiming `realsize` bytes, with 512 bytes of data."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)           # sparse map: one 512-byte run
    header[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)    # the size it expands to
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header[:512]) + b"\1" * 512


def add(tar, name, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_tar_members_are_capped_and_sparse_members_never_expand():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "a.jpg", jpeg())
        add(tar, "big.jpg", jpeg() + b"\0" * 4000)
        end = tar.offset
    data = buf.getvalue()[:end] + sparse_member("bomb.jpg", 1 << 30) + b"\0" * 10240
    contents = read_tar(data, max_bytes=3000)
    assert set(contents.samples) == {"a"}
    assert "sparse" in contents.rejected["bomb"] and "exceed inputs.max_bytes" in contents.rejected["big"]
    assert isinstance(contents.samples["a"]["jpg"], memoryview)        # views, not copies


def test_capture_zip_bombs_and_oversized_frames_are_refused(tmp_path):
    cap = synth_capture(tmp_path / "cap", cameras=2, frames=1, height=32, width=24, seed=4)
    c = Capture(str(cap))
    cam, frame = sorted(c.cameras)[0], c.frames[0]
    member = f"cam{cam}/{frame:06d}.png"
    with zipfile.ZipFile(cap / "image" / f"cam{cam}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, b"\0" * (20 << 20))              # 20 MB of zeros in ~20 KB
    assert (cap / "image" / f"cam{cam}.zip").stat().st_size < 100_000
    with pytest.raises(CaptureError, match="more than inputs.max_zip_ratio"):
        Capture(str(cap)).image(cam, frame)
    with pytest.raises(CaptureError, match="more than inputs.max_bytes"):
        Capture(str(cap), inputs=InputPolicy(max_bytes=1 << 20, max_zip_ratio=10**6)).image(cam, frame)
    other = sorted(c.cameras)[1]          # frames obey filters.max_pixels like photos
    assert Capture(str(cap)).image(other, frame).shape == (32, 24, 3)
    with pytest.raises(CaptureError, match="decompression bomb refused: 24x32 exceeds 500"):
        Capture(str(cap), max_pixels=500).image(other, frame)


# ---- 5. WebDataset sources lose nothing silently -----------------------------------------------

def test_every_tar_member_gets_a_row():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for k in range(3):
            add(tar, f"k{k}.jpg", jpeg(seed=k))
            add(tar, f"k{k}.json", b"{}")
        add(tar, "k1.jpg", jpeg(seed=9))                          # duplicate name: k1 rejected
        add(tar, "k3.jpg", linkname="k0.jpg", type=tarfile.SYMTYPE)
        add(tar, "k4.jpg", linkname="k0.jpg", type=tarfile.LNKTYPE)
        add(tar, "k5.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        add(tar, "sub", type=tarfile.DIRTYPE)
        add(tar, "k6.jpg", jpeg(seed=6))
        add(tar, "k7.jpg", jpeg(seed=7))
        add(tar, "k8.jpg", jpeg(seed=8))
    data = bytearray(buf.getvalue())
    names = {m.name: m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(data)))}
    data[names["k7.jpg"]:names["k7.jpg"] + 512] = b"garbage!" * 64      # corrupt header mid-tar
    item = InputItem("file:///x/a.tar", "wds", "file:///x/a.tar")
    rows = {r["input_id"].split("#", 1)[1]: r for r in tar_rows(item, bytes(data), 10**6)}
    kept = {k for k, r in rows.items() if not r["stage"]}
    assert kept == {"k0", "k2", "k6"}
    reasons = {k: r["reason"] for k, r in rows.items() if r["stage"]}
    assert "appears twice" in reasons["k1"] and "link" in reasons["k3"] and "link" in reasons["k4"]
    assert "not a regular file" in reasons["k5"] and "directory" in reasons["sub/"]
    remainder = [k for k in reasons if k.startswith("remainder@")]
    assert remainder == [f"remainder@{names['k7.jpg']}"] and "corrupt tar header" in reasons[remainder[0]]
    assert all(r["stage"] == "decode" and "\n" not in r["reason"] for r in rows.values() if r["stage"])


def test_compressed_tars_get_rows_and_an_empty_source_fails(tmp_path):
    wds = tmp_path / "wds"
    wds.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, "k0.jpg", jpeg())
    for name in ("a.tar.gz", "b.tgz", "c.tar.xz"):
        (wds / name).write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(DataError) as info:
        enumerate_source(Source("webdataset", str(wds)))
    assert "yields no inputs" in str(info.value) and "compressed tars are not read" in str(info.value)
    assert "\n" not in str(info.value)
    (wds / "UPPER.TAR").write_bytes(buf.getvalue())
    items, rejects = enumerate_source(Source("webdataset", str(wds)))
    assert [Path(i.uri).name for i in items] == ["UPPER.TAR"]
    assert sorted(Path(r["input_id"]).name for r in rejects) == ["a.tar.gz", "b.tgz", "c.tar.xz"]
    assert {r["stage"] for r in rejects} == {"source"}


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
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "build", str(cfg)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vid = proc.stdout.strip().splitlines()[-1]
    from dataprep.store import DatasetStore
    ds = DatasetStore(str(store))
    v = ds.resolve(vid)
    inputs = ds.ledger(v).to_pylist()
    rejects = ds.rejects(v).to_pylist()
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
