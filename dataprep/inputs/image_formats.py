"""The image formats we decode, and nothing else.

Pillow picks its decoder from the bytes, not from the file name, and it knows ~40 formats: a
PostScript file named `.jpg` is handed to Ghostscript, and SPIDER, IM, SGI, DDS, QOI, TGA ... are
parsed by plugins nobody meant to expose to untrusted input. Every decode of untrusted bytes goes
through `open_image` (or checks `sniff` before cv2), which lets Pillow try only the allowed
formats' plugins.
"""
from __future__ import annotations

import io

from PIL import Image


# Photos, listed URLs and WebDataset members.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
# Studio capture frames (SPEC §3: .avif | .jpg | .png); segmentation masks are PNG.
FRAME_FORMATS = ("AVIF", "JPEG", "PNG")
MASK_FORMATS = ("PNG",)


class FormatError(ValueError):
    """Bytes that are not one of the allowed formats; `reason` is one line for the ledger."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _accepts(fmt: str, prefix: bytes) -> bool:
    """Whether Pillow's plugin for `fmt` claims `prefix` (its `_accept`: a pure byte comparison
    on the first 16 bytes, no decoding). Plugins without one (SPIDER, TGA, IM, ...) never match."""
    Image.init()
    entry = Image.OPEN.get(fmt)
    if entry is None or entry[1] is None:
        return False
    try:
        return bool(entry[1](prefix))
    except Exception:
        return False


def sniff(data: bytes, allowed=PHOTO_FORMATS) -> str | None:
    """The allowed format whose signature `data` starts with, or None."""
    prefix = bytes(data[:16])
    return next((fmt for fmt in allowed if _accepts(fmt, prefix)), None)


def describe_format(data: bytes) -> str | None:
    """The first format (by name) whose signature the bytes match, or None: a hint for the reason
    only (formats without a signature, like TGA, may match another one's)."""
    prefix = bytes(data[:16])
    Image.init()
    return next((fmt for fmt in sorted(Image.OPEN) if _accepts(fmt, prefix)), None)


def check_format(data: bytes, allowed=PHOTO_FORMATS) -> str:
    """The format of `data` if it is allowed, else FormatError('format not allowed (signature
    of EPS; allowed: ...)'). The name is Pillow's guess from the first bytes, never a decode."""
    if not data:
        raise FormatError("empty file (0 bytes)")
    fmt = sniff(data, allowed)
    if fmt is None:
        named = describe_format(data)
        seen = f"signature of {named}" if named else "unrecognised signature"
        raise FormatError(f"format not allowed ({seen}; allowed: {', '.join(allowed)})")
    return fmt


def open_image(data: bytes, allowed=PHOTO_FORMATS) -> Image.Image:
    """`Image.open` restricted to the allowed formats (header parsed, pixels not decoded yet).

    The signature check comes first so a refused format gets its own reason; `formats=` then makes
    sure no other plugin is ever tried, whatever the bytes claim."""
    fmt = check_format(data, allowed)
    return Image.open(io.BytesIO(data), formats=[fmt])
