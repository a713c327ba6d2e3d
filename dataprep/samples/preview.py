"""Contact sheets: a grid of views with their spatial anchors overlaid, captioned, as one PNG."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw


def overlay_anchor(image: np.ndarray, anchor_chw: np.ndarray) -> np.ndarray:
    """Paint the anchor (3, H, W) over the view (H, W, 3) where the anchor is drawn (non-black)."""
    anchor = anchor_chw.transpose(1, 2, 0).astype(np.float32)
    alpha = anchor.max(axis=-1, keepdims=True) / 255.0
    return np.round(image * (1 - alpha) + anchor * alpha).astype(np.uint8)


def contact_sheet(tiles: list[np.ndarray], captions: list[str] | None = None, tile_height: int = 192,
                  columns: int | None = None, title: str | None = None) -> Image.Image:
    """Grid of (H, W, 3) uint8 tiles scaled to a common height, each with a caption under it."""
    if not tiles:
        raise ValueError("contact sheet needs at least one tile")
    captions = captions or [""] * len(tiles)
    scaled = []
    for tile in tiles:
        h, w = tile.shape[:2]
        size = (max(1, round(w * tile_height / h)), tile_height)
        scaled.append(Image.fromarray(tile).resize(size, Image.Resampling.BILINEAR))
    columns = columns or max(1, math.ceil(math.sqrt(len(tiles) * 1.5)))
    cell_w = max(im.width for im in scaled) + 6
    cell_h = tile_height + 18
    top = 20 if title else 0
    rows = math.ceil(len(scaled) / columns)
    sheet = Image.new("RGB", (columns * cell_w, top + rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill=(235, 235, 235))
    for k, (im, caption) in enumerate(zip(scaled, captions)):
        x, y = (k % columns) * cell_w + 3, top + (k // columns) * cell_h + 3
        sheet.paste(im, (x, y))
        draw.text((x, y + tile_height + 2), caption, fill=(210, 210, 210))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def frame_contact_sheet(capture, frame: int, cameras: list[str] | None = None, tile_height: int = 192,
                        axis_length: float = 0.2) -> Image.Image:
    """All views of one capture frame with their spatial anchors overlaid (undistorted views)."""
    from dataprep.studio.anchors import draw_anchor
    from dataprep.studio.geometry import undistort_image

    pose = capture.head_pose(frame)
    tiles, captions = [], []
    for cam_id in cameras or sorted(capture.cameras):
        cam = capture.camera(cam_id)
        image = undistort_image(capture.image(cam_id, frame), cam.K, cam.dist)
        h, w = image.shape[:2]
        anchor = draw_anchor(cam.K, cam.R, cam.t, h, w, pose, axis_length)
        tiles.append(overlay_anchor(image, anchor.image))
        captions.append(f"cam {cam_id}")
    return contact_sheet(tiles, captions, tile_height, title=f"{capture.name} frame {frame}")
