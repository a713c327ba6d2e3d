"""Unstructured photos -> samples: safe decoding, colour normalisation, filters, crop and encode.

Every refusal raises `Rejected(stage, reason)`, which the build records in the rejects ledger.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from dataprep.build_config import PhotoFilters
from dataprep.inputs.image_formats import PHOTO_FORMATS, FormatError, open_image


class Rejected(Exception):
    """An input that is not kept: `stage` (fetch, decode, filter, ...) and a one-line reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass
class Photo:
    rgb: np.ndarray              # (H, W, 3) uint8, upright (EXIF orientation applied)
    orig_width: int              # as stored in the file (before EXIF rotation)
    orig_height: int
    mode: str                    # the source's PIL mode (CMYK, I;16, P, RGBA, ...)
    exif_rotated: bool
    exif_rotated_90: bool = False

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) of the full-resolution upright photo (what filters judge)."""
        w, h = self.orig_width, self.orig_height
        return (h, w) if self.exif_rotated_90 else (w, h)


def decode_photo(data: bytes, max_pixels: int, min_side: int | None = None,
                 formats: tuple[str, ...] = PHOTO_FORMATS) -> Photo:
    """Decode a photo of one of `formats` to upright 8-bit RGB, refusing bombs before decoding
    pixels. Any other format (PostScript, SPIDER, TGA, ... whatever the file is named) is refused
    before any decoder sees it (dataprep.inputs.image_formats).

    With `min_side`, JPEGs are decoded at a reduced DCT scale (PIL's draft mode: 1/2, 1/4, 1/8)
    whenever the shorter side stays >= min_side — the output is resized below that anyway, and
    skipping the full-size inverse DCT is the single largest saving of the build.
    """
    if not data:
        raise Rejected("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # our own limit (max_pixels, checked from the header below) decides; PIL still raises
            # DecompressionBombError past twice its default limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_image(data, formats)
            width, height = im.size
            if width * height > max_pixels:
                raise Rejected("decode", f"decompression bomb refused: {width}x{height} "
                                         f"exceeds {max_pixels} pixels")
            mode = im.mode
            orientation = _orientation(im)
            if min_side and im.format == "JPEG" and mode in ("RGB", "L", "YCbCr"):
                scale = min_side / min(width, height)
                im.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            im.load()
            upright = ImageOps.exif_transpose(im) if orientation not in (None, 1) else im
    except Rejected:
        raise
    except FormatError as exc:
        raise Rejected("decode", exc.reason) from None
    except Image.DecompressionBombError as exc:
        raise Rejected("decode", f"decompression bomb refused: {exc}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise Rejected("decode", f"not a readable image ({type(exc).__name__}: {exc})") from None
    return Photo(_to_rgb(upright), width, height, mode, orientation not in (None, 1),
                 exif_rotated_90=orientation in (5, 6, 7, 8))


def _orientation(im: Image.Image):
    try:
        return im.getexif().get(0x0112)
    except Exception:
        return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any mode -> 8-bit RGB: 16/32-bit greys scaled (not clipped), alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))   # convert() copies even RGB


def apply_filters(photo: Photo, filters: PhotoFilters) -> None:
    """Size and aspect: what needs no model."""
    w, h = photo.upright_size
    if min(h, w) < filters.min_side:
        raise Rejected("filter", f"too small: {w}x{h}, shorter side < {filters.min_side}")
    if max(h, w) / min(h, w) > filters.max_aspect:
        raise Rejected("filter", f"aspect {max(h, w) / min(h, w):.2f} > {filters.max_aspect}")
    # detect_person / detect_face are judged by the detection stage (dataprep.samples.detection)


def center_square(rgb: np.ndarray, side_out: int) -> tuple[np.ndarray, list[int]]:
    """Centre square crop resized to side_out; returns the image and the crop box [x0, y0, side]."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    crop = rgb[y0:y0 + side, x0:x0 + side]
    return resize(crop, side_out, side_out), [x0, y0, side]


def resize(rgb: np.ndarray, width: int, height: int, nearest: bool = False) -> np.ndarray:
    """cv2.resize maps pixel centres as x_src = (x_dst + 0.5)/s − 0.5: exactly the half-pixel
    rule of SPEC §4, so intrinsics from `geometry.resize_intrinsics` describe the result."""
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    if nearest:
        flag = cv2.INTER_NEAREST
    else:
        flag = cv2.INTER_AREA if width < w else cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, height), interpolation=flag)


def encode(rgb: np.ndarray, lossless: bool, quality: int) -> tuple[bytes, str]:
    """uint8 RGB/greyscale -> (bytes, extension) with OpenCV's codecs (faster than PIL's here)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    if lossless:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        ext = "png"
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        ext = "jpg"
    if not ok:
        raise RuntimeError("image encoding failed")
    return buf.tobytes(), ext


def png(array: np.ndarray) -> bytes:
    return encode(array, True, 0)[0]
