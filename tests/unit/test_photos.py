"""Photo decoding: bombs refused from the header, colour modes normalised, EXIF applied, draft decode."""
import io

import numpy as np
import pytest
from PIL import Image

from corpus import bomb_png
from dataprep.inputs.photos import Rejected, decode_photo


def encode(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bomb_is_refused_by_the_configured_limit_before_decoding():
    data = bomb_png(9000, 9000)               # 81 MP claimed: under PIL's own limit
    with pytest.raises(Rejected, match="decompression bomb refused: 9000x9000 exceeds 64000000"):
        decode_photo(data, max_pixels=64_000_000)
    with pytest.raises(Rejected) as info:     # allowed by the limit, so PIL decodes and fails
        decode_photo(data, max_pixels=100_000_000)
    assert info.value.stage == "decode" and "bomb" not in info.value.reason


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    photo = decode_photo(encode(Image.fromarray(ramp)), 10**8)
    assert photo.rgb.dtype == np.uint8 and photo.rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(photo.rgb[..., 0].astype(float), ramp / 257.0, atol=1.0)


def test_alpha_is_composited_on_white_and_cmyk_converted():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255                      # left half opaque red, right half transparent
    photo = decode_photo(encode(Image.fromarray(rgba, "RGBA")), 10**8)
    assert photo.rgb[0, 0].tolist() == [255, 0, 0] and photo.rgb[0, 7].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))      # pure red in CMYK
    photo = decode_photo(encode(cmyk, "JPEG", quality=95), 10**8)
    assert photo.mode == "CMYK" and photo.rgb[8, 8, 0] > 200 and photo.rgb[8, 8, 1] < 60


def test_exif_orientation_is_applied():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255                         # white left half of a landscape photo
    exif = Image.Exif()
    exif[0x0112] = 6                          # display rotated 90° clockwise
    photo = decode_photo(encode(Image.fromarray(img), "JPEG", exif=exif.tobytes(), quality=95), 10**8)
    assert photo.rgb.shape[:2] == (40, 20) and photo.exif_rotated and photo.upright_size == (20, 40)
    assert photo.rgb[5, 10].mean() > 200 and photo.rgb[35, 10].mean() < 50   # white half now on top


def test_draft_decode_keeps_enough_pixels_for_the_output():
    img = (np.random.default_rng(0).uniform(0, 255, (1200, 1600, 3))).astype(np.uint8)
    data = encode(Image.fromarray(img), "JPEG", quality=90)
    full = decode_photo(data, 10**8)
    small = decode_photo(data, 10**8, min_side=256)
    assert full.rgb.shape[:2] == (1200, 1600)
    assert min(small.rgb.shape[:2]) >= 256 and small.rgb.shape[0] < 1200      # reduced DCT scale
    assert (small.orig_width, small.orig_height) == (1600, 1200)
