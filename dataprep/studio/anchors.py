"""Spatial anchors (Pippo §3.3): the head pose drawn into each view.

The head pose is a 3×4 head-to-world [R|t]. Its origin and the ends of its three axes are
projected into the view and drawn on black at the view's resolution: the three axes as lines
(x red, y green, z blue) and the origin as a white disc on top. The origin's pixel position is
returned as `anchor_uv`. Geometry behind the camera is never drawn: axis segments are clipped at
the near plane in camera space (so a half-visible axis draws its visible half), and every point
behind the camera is flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

AXIS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))   # RGB for the head's x, y, z axes
ORIGIN_COLOR = (255, 255, 255)
NEAR = 1e-3            # metres: the near plane the axis segments are clipped at
SUBPIXEL_BITS = 4      # cv2 drawing with 1/16 px precision so the disc centre is exact
# Drawn without anti-aliasing: every pixel is one of 8 pure colours, so the anchor stores
# losslessly as a 3-bit palette PNG (~1 KB at 1024², 8× smaller than the anti-aliased RGB PNG).
LINE = cv2.LINE_8
PALETTE = [c for bits in range(8) for c in (255 * (bits & 1), 255 * (bits >> 1 & 1), 255 * (bits >> 2 & 1))]


@dataclass
class Anchor:
    image: np.ndarray          # (3, H, W) uint8, channels first (SPEC §5 anchor.npy layout)
    uv: np.ndarray             # (2,) float64 pixel position of the head origin (NaN if behind)
    behind: np.ndarray         # (4,) bool: origin, x end, y end, z end behind the camera


def anchor_points(head_pose, axis_length: float) -> np.ndarray:
    """World positions (4, 3) of the head origin and its three axis ends."""
    pose = np.asarray(head_pose, np.float64)
    R, t = pose[:, :3], pose[:, 3]
    return np.concatenate([t[None], t[None] + axis_length * R.T], axis=0)


def draw_anchor(K, R, t, height: int, width: int, head_pose, axis_length: float = 0.2,
                radius: float | None = None, thickness: int | None = None) -> Anchor:
    """Render the spatial anchor of `head_pose` into the view (K, R, t, height, width)."""
    K, R, t = (np.asarray(a, np.float64) for a in (K, R, t))
    pts = anchor_points(head_pose, axis_length)
    cam = pts @ R.T + t                                   # camera-space points, (4, 3)
    behind = cam[:, 2] <= NEAR
    scale = max(height, width)
    radius = radius if radius is not None else max(1.5, scale / 80)
    thickness = thickness if thickness is not None else max(1, int(round(scale / 200)))
    canvas = np.zeros((height, width, 3), np.uint8)
    shift = 1 << SUBPIXEL_BITS

    def to_px(p_cam):
        uvw = K @ p_cam
        return uvw[:2] / uvw[2]

    def fixed(uv):
        return tuple(int(round(v * shift)) for v in uv)

    for axis in range(3):
        a, b = cam[0].copy(), cam[axis + 1].copy()
        if a[2] <= NEAR and b[2] <= NEAR:
            continue
        # Clip the segment to z > NEAR (camera space) so what is drawn is the true projection.
        if a[2] <= NEAR or b[2] <= NEAR:
            s = (NEAR - a[2]) / (b[2] - a[2])
            clipped = a + s * (b - a)
            a, b = (clipped, b) if a[2] <= NEAR else (a, clipped)
        # After near-plane clipping |u| <= f·|x|/NEAR, far inside cv2's int32 fixed-point range.
        ua, ub = to_px(a), to_px(b)
        cv2.line(canvas, fixed(ua), fixed(ub), AXIS_COLORS[axis], thickness, LINE, SUBPIXEL_BITS)
    uv = np.full(2, np.nan)
    if not behind[0]:
        uv = to_px(cam[0])
        cv2.circle(canvas, fixed(uv), int(round(radius * shift)), ORIGIN_COLOR, -1, LINE, SUBPIXEL_BITS)
    return Anchor(image=np.ascontiguousarray(canvas.transpose(2, 0, 1)), uv=uv, behind=behind)


def anchor_png(image_chw: np.ndarray) -> bytes:
    """Lossless 3-bit palette PNG of an anchor image (3, H, W) whose channels are 0 or 255."""
    import io

    from PIL import Image

    hwc = image_chw.transpose(1, 2, 0) > 127
    index = (hwc[..., 0] * 1 + hwc[..., 1] * 2 + hwc[..., 2] * 4).astype(np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(PALETTE)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True, bits=3)
    return buf.getvalue()
