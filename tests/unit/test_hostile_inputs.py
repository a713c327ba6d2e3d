"""Hostile and careless inputs (issue 10, items 1-5): no decoder we did not mean, no request to a
private address, no read outside the sources, no unbounded read or wait, no silent loss.
Every hostile input is built here; functions are called directly (no Ray) except one CLI build."""
import io
import json
import os
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataprep.inputs import safe_fetch
from dataprep.build_config import HttpConfig, InputPolicy, Source
from dataprep.studio.capture import Capture, decode_image
from dataprep.errors import CaptureError
from pippo_common.errors import DataError
from dataprep.inputs.photos import Rejected, decode_photo
from dataprep.inputs.sources import OUTSIDE, InputItem, enumerate_source, fetch, read_tar, tar_rows
from dataprep.studio.synth import synth_capture
from support import jpeg, saved, EPS  # shared with this file's other half



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
    from pipelines.reprojection import read_views
    cam = {"K": np.eye(3).tolist(), "R": np.eye(3).tolist(), "t": [0, 0, 1], "height": 16, "width": 16}
    (tmp_path / "cameras.json").write_text(json.dumps({"views": [cam, cam]}))
    (tmp_path / "view00.png").write_bytes(saved("PNG"))
    (tmp_path / "view01.png").write_bytes(EPS)
    with pytest.raises(UserError, match=r"format not allowed \(signature of EPS"):
        read_views(tmp_path)


# ---- 2. server-side request forgery ------------------------------------------------------------


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
