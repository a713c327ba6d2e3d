"""A bad-input corpus for build tests: every way a photo or a capture can be broken."""
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dataprep.studio.synth import synth_image


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header claims width×height pixels (IHDR patched, CRC recomputed)."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = 8 + 4  # signature, then the IHDR chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 4 + 13])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def write_bad_photos(out: Path, seed: int = 0) -> dict[str, str]:
    """Write broken and awkward photos; returns {file name: expected outcome ('kept' or a stage)}."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    person = Image.fromarray(synth_image(rng))
    w, h = person.size
    expected = {}

    def put(name, data, outcome):
        (out / name).write_bytes(data)
        expected[name] = outcome

    good = _jpeg(person)
    put("truncated.jpg", good[: len(good) // 3], "decode")
    put("zero.jpg", b"", "decode")
    put("not_an_image.jpg", b"this is a text file, not a JPEG\n" * 20, "decode")
    put("bomb.png", bomb_png(), "decode")
    put("cmyk.jpg", _jpeg(person.convert("CMYK")), "kept")
    grey16 = Image.fromarray((np.asarray(person.convert("L"), np.uint16) * 257).astype(np.uint16))
    put("grey16.png", _png(grey16), "kept")
    exif = Image.Exif()
    exif[0x0112] = 6                      # rotate 90° clockwise to display
    put("exif_rotated.jpg", _jpeg(person, exif=exif.tobytes()), "kept")
    rgba = person.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((h, w), 128, np.uint8)))
    put("alpha.png", _png(rgba), "kept")
    put("palette.png", _png(person.convert("P", palette=Image.Palette.ADAPTIVE)), "kept")
    put("tiny.png", _png(person.resize((40, 30))), "filter")
    put("duplicate_a.jpg", good, "kept")
    put("duplicate_b.jpg", good, "dedup")
    return expected


def break_calibration(capture_dir: Path, out: Path, how: str) -> Path:
    """Copy a capture and break it: 'nan_camera' (one camera's T has a NaN), 'json' (calibration
    is not JSON)."""
    shutil.copytree(capture_dir, out)
    calib = out / "camera_calibration.json"
    if how == "json":
        calib.write_text("{ this is not json")
    elif how == "nan_camera":
        data = json.loads(calib.read_text())
        data["KRT"][0]["T"][3][1] = float("nan")
        calib.write_text(json.dumps(data))
    else:
        raise ValueError(how)
    return out
