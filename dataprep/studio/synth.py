"""Synthetic studio captures and photos of a procedural, textured, human-like figure.

The figure is a set of ellipsoids (head, neck, torso, pelvis, arms, legs), each with its own
piecewise-constant procedural texture (cells of distinct colours that feature matchers lock
onto; the head carries a face: eyes, brows, nose, mouth, hair). It is rendered EXACTLY by
casting the ray of every pixel centre (SPEC §4, through the lens model when the camera has
distortion) and intersecting it analytically with every ellipsoid. Because the ray of pixel
(i, j) is the one the stored camera assigns to it, a surface point projects, through the stored
camera, onto the pixel it was drawn at — the reprojection checks downstream depend on this.

Units: metres, world z up, the figure stands at the origin facing +y.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dataprep.studio.capture import Camera, CaptureWriter
from dataprep.studio.geometry import camera_center, look_at, undistort_normalized

HEAD_CENTER = np.array([0.0, 0.0, 1.62])
PART_NAMES = ("background", "head", "neck", "torso", "pelvis", "upper_arm_l", "upper_arm_r",
              "lower_arm_l", "lower_arm_r", "upper_leg_l", "upper_leg_r", "lower_leg_l", "lower_leg_r")

# (centre, radii, tilt about y in degrees) of the body parts in world coordinates; the head is
# placed by the head pose instead.
_BODY = {
    2: ((0.0, 0.0, 1.47), (0.05, 0.05, 0.08), 0),
    3: ((0.0, 0.0, 1.20), (0.18, 0.11, 0.27), 0),
    4: ((0.0, 0.0, 0.92), (0.16, 0.10, 0.11), 0),
    5: ((-0.24, 0.0, 1.27), (0.05, 0.05, 0.16), -12),
    6: ((0.24, 0.0, 1.27), (0.05, 0.05, 0.16), 12),
    7: ((-0.29, 0.02, 0.98), (0.04, 0.04, 0.15), -4),
    8: ((0.29, 0.02, 0.98), (0.04, 0.04, 0.15), 4),
    9: ((-0.09, 0.0, 0.66), (0.07, 0.07, 0.22), 0),
    10: ((0.09, 0.0, 0.66), (0.07, 0.07, 0.22), 0),
    11: ((-0.09, 0.0, 0.24), (0.055, 0.055, 0.22), 0),
    12: ((0.09, 0.0, 0.24), (0.055, 0.055, 0.22), 0),
}
HEAD_RADII = (0.085, 0.095, 0.12)
# Per part: base RGB, cell counts (azimuth, elevation) of its checker and colour jitter.
_TEXTURE = {
    1: ((224, 172, 140), (24, 12), 18),
    2: ((214, 160, 128), (10, 4), 20),
    3: ((40, 90, 170), (16, 10), 70),
    4: ((60, 60, 70), (14, 4), 50),
    5: ((200, 60, 50), (8, 8), 60), 6: ((200, 60, 50), (8, 8), 60),
    7: ((214, 160, 128), (8, 8), 30), 8: ((214, 160, 128), (8, 8), 30),
    9: ((50, 120, 60), (8, 10), 60), 10: ((50, 120, 60), (8, 10), 60),
    11: ((110, 80, 50), (8, 10), 60), 12: ((110, 80, 50), (8, 10), 60),
}


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis].astype(np.float64)


def head_pose_for_frame(frame: int, seed: int = 0) -> np.ndarray:
    """3×4 head-to-world pose that turns and nods smoothly from frame to frame."""
    phase = (seed % 97) * 0.37
    yaw = 20.0 * math.sin(0.9 * frame + phase)
    pitch = 10.0 * math.sin(1.3 * frame + 2 * phase)
    roll = 5.0 * math.sin(0.7 * frame + 3 * phase)
    R = rotation("z", yaw) @ rotation("x", pitch) @ rotation("y", roll)
    t = HEAD_CENTER + 0.01 * np.array([math.sin(frame), 0.0, math.cos(1.7 * frame) - 1])
    return np.concatenate([R, t[:, None]], axis=1)


@dataclass
class Ellipsoid:
    part: int
    center: np.ndarray
    R: np.ndarray           # local -> world
    radii: np.ndarray


def figure(head_pose: np.ndarray) -> list[Ellipsoid]:
    parts = [Ellipsoid(1, head_pose[:, 3].copy(), head_pose[:, :3].copy(), np.array(HEAD_RADII))]
    for part, (c, r, tilt) in _BODY.items():
        parts.append(Ellipsoid(part, np.array(c, np.float64), rotation("y", tilt), np.array(r, np.float64)))
    return parts


def _cell_hash(a: np.ndarray, b: np.ndarray, part: int) -> np.ndarray:
    """Deterministic per-cell pseudo-random values in [0, 1) (integer mixing, no RNG state)."""
    h = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (part * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def texture(part: int, local: np.ndarray) -> np.ndarray:
    """Albedo (N, 3) uint8 of points `local` (N, 3) on the unit sphere of ellipsoid `part`.

    Local axes: x right, y front, z up. Texture is piecewise constant over (azimuth, elevation)
    cells, each cell its own colour, so every pixel colour is exactly a texture value.
    """
    base, (na, ne), jitter = _TEXTURE[part]
    az = np.arctan2(local[:, 0], local[:, 1])                  # 0 at the front (+y), in (−π, π]
    el = np.arcsin(np.clip(local[:, 2], -1, 1))                # −π/2 .. π/2
    ia = np.floor((az + np.pi) / (2 * np.pi) * na).astype(np.int64)
    ie = np.floor((el + np.pi / 2) / np.pi * ne).astype(np.int64)
    noise = np.stack([_cell_hash(ia, ie, part * 3 + k) for k in range(3)], axis=-1)
    rgb = np.asarray(base, np.float64) + (noise - 0.5) * 2 * jitter
    if part == 1:
        rgb = _face(rgb, np.degrees(az), np.degrees(el))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _face(rgb: np.ndarray, az: np.ndarray, el: np.ndarray) -> np.ndarray:
    """Paint a face on the head's texture: hair, brows, eyes with pupils, nose, mouth."""
    rgb = rgb.copy()
    hair = (el > 35) | (np.abs(az) > 100) | ((np.abs(az) > 70) & (el > 0))
    rgb[hair] = (60, 35, 20)
    for side in (-1, 1):
        eye = (az - side * 28) ** 2 + ((el - 12) * 1.6) ** 2
        rgb[(eye < 90) & ~hair] = (250, 250, 245)
        rgb[(eye < 22) & ~hair] = (30, 60, 110)
        brow = (np.abs(az - side * 28) < 14) & (np.abs(el - 23) < 2.5)
        rgb[brow] = (50, 30, 20)
    nose = (np.abs(az) < 5) & (el > -8) & (el < 8)
    rgb[nose] = (190, 130, 105)
    mouth = (np.abs(az) < 20) & (np.abs(el + 22 + 0.012 * az ** 2) < 3)
    rgb[mouth] = (170, 40, 50)
    return rgb


def pixel_rays(cam: Camera, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre o (3,) and unit world directions (H·W, 3) of every pixel centre, lens included."""
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    uv = np.stack([jj.ravel(), ii.ravel()], axis=-1)
    K = cam.K
    xy_d = (uv - K[:2, 2]) @ np.linalg.inv(K[:2, :2]).T       # distorted normalised coordinates
    xy = undistort_normalized(xy_d, cam.dist) if cam.distorted else xy_d
    d_cam = np.concatenate([xy, np.ones((xy.shape[0], 1))], axis=1)
    d = d_cam @ cam.R                                          # Rᵀ d_cam, row-wise
    return camera_center(cam.R, cam.t), d / np.linalg.norm(d, axis=1, keepdims=True)


def background(height: int, width: int, kind: str = "studio", rng: np.random.Generator | None = None) -> np.ndarray:
    """Studio grey gradient, or a random clutter background for unstructured photos."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    if kind == "studio":
        return np.broadcast_to((70 + 40 * y) * np.ones(3), (height, width, 3)).astype(np.uint8)
    rng = rng or np.random.default_rng()
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 * (1 - y) + c1 * y + 0 * x
    freq, angle = rng.uniform(3, 25), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))
    img = img + rng.uniform(10, 50) * stripes + rng.normal(0, rng.uniform(2, 15), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(cam: Camera, height: int, width: int, head_pose: np.ndarray,
           bg: np.ndarray | None = None) -> dict:
    """Ray-cast the figure: {"image" (H,W,3) u8, "labels" (H,W) u8 part ids, "points" (H,W,3) world
    surface points (NaN on background), "depth" (H,W) ray length (inf on background)}."""
    o, d = pixel_rays(cam, height, width)
    n = d.shape[0]
    best = np.full(n, np.inf)
    label = np.zeros(n, np.uint8)
    local = np.zeros((n, 3))
    for e in figure(head_pose):
        # Ray o + s·d against the unit sphere in the ellipsoid's scaled local frame:
        # |o' + s d'|² = 1 with o' = Rᵀ(o − c)/r, d' = Rᵀd/r (a quadratic a s² + b s + c = 0).
        o_l = (e.R.T @ (o - e.center)) / e.radii
        d_l = (d @ e.R) / e.radii
        a = np.einsum("nk,nk->n", d_l, d_l)
        b = 2 * d_l @ o_l
        c = o_l @ o_l - 1
        disc = b * b - 4 * a * c
        hit = disc > 0
        s = np.full(n, np.inf)
        s[hit] = (-b[hit] - np.sqrt(disc[hit])) / (2 * a[hit])
        closer = hit & (s > 0) & (s < best)
        best[closer] = s[closer]
        label[closer] = e.part
        local[closer] = o_l + s[closer, None] * d_l[closer]
    image = (bg if bg is not None else background(height, width)).reshape(n, 3).copy()
    for part in np.unique(label[label > 0]):
        sel = label == part
        image[sel] = texture(int(part), local[sel])
    points = np.where(np.isfinite(best)[:, None], o + best[:, None] * d, np.nan)
    return {"image": image.reshape(height, width, 3), "labels": label.reshape(height, width),
            "points": points.reshape(height, width, 3), "depth": best.reshape(height, width)}


def dome_cameras(n: int, height: int, width: int, seed: int = 0, distortion: bool = False) -> list[Camera]:
    """`n` cameras on a dome around the figure, aimed at the head, with varied valid intrinsics.

    Portrait frames (Ava-256 is 4096×2668); focal lengths give a 30–40° vertical field of view;
    principal points move a few percent; azimuths follow the golden angle so any n covers 360°.
    """
    rng = np.random.default_rng(seed)
    cams = []
    for k in range(n):
        az = math.radians((k * 137.50776 + rng.uniform(-5, 5)) % 360)
        el = math.radians(rng.uniform(-10, 40))
        radius = rng.uniform(1.8, 2.6)
        eye = HEAD_CENTER + radius * np.array([math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])
        target = HEAD_CENTER + np.array([0.0, 0.0, -0.35]) + rng.normal(0, 0.03, 3)
        R, t = look_at(eye, target)
        fy = (height / 2) / math.tan(math.radians(rng.uniform(15, 20)))
        fx = fy * rng.uniform(0.98, 1.02)
        cx = (width - 1) / 2 + rng.uniform(-0.03, 0.03) * width
        cy = (height - 1) / 2 + rng.uniform(-0.03, 0.03) * height
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        dist = (np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.05, 0.05),
                          rng.uniform(-0.002, 0.002), rng.uniform(-0.002, 0.002)])
                if distortion else np.zeros(4))
        cams.append(Camera(f"{400000 + 17 * k + seed % 17:06d}", K, R, t, dist))
    return cams


def render_views(n_views: int, height: int, width: int, seed: int = 0, frame: int = 0) -> list[dict]:
    """Rendered views of one frame with their cameras: dicts of image, K, R, t, height, width,
    points (world surface point per pixel, NaN on background), labels."""
    pose = head_pose_for_frame(frame, seed)
    views = []
    for cam in dome_cameras(n_views, height, width, seed):
        out = render(cam, height, width, pose)
        views.append({"image": out["image"], "labels": out["labels"], "points": out["points"],
                      "K": cam.K, "R": cam.R, "t": cam.t, "height": height, "width": width,
                      "camera_id": cam.id})
    return views


def _check_counts(**counts: int) -> None:
    """Counts and sizes must be positive (a negative count would silently write nothing, zero
    cameras an unreadable capture); sides at least 16 px."""
    for name, value in counts.items():
        low = 16 if name in ("height", "width") else 1
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def synth_capture(out_dir: str | Path, cameras: int = 8, frames: int = 2, height: int = 256,
                  width: int = 168, seed: int = 0, fmt: str = "png", masks: bool = True,
                  distortion: bool = False, progress=None) -> Path:
    """Render one capture and write it in the SPEC §3 layout (atomically: temp dir, then rename)."""
    _check_counts(cameras=cameras, frames=frames, height=height, width=width)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cams = dome_cameras(cameras, height, width, seed, distortion)
    frame_ids = list(range(0, 10 * frames, 10))          # Ava frame ids are sparse, not 0..n
    writer = CaptureWriter(out_dir)
    writer.write_calibration(cams)
    writer.write_frame_list(frame_ids)
    for f in frame_ids:
        pose = head_pose_for_frame(f, seed)
        writer.add_head_pose(f, pose)
        for cam in cams:
            out = render(cam, height, width, pose)
            writer.add_image(cam.id, f, out["image"], fmt)
            if masks:
                writer.add_mask(cam.id, f, out["labels"])
            if progress is not None:
                progress.update(1)
    return writer.commit()


def synth_image(rng: np.random.Generator, person: bool = True) -> np.ndarray:
    """One unstructured photo: the figure from a random viewpoint over a random background."""
    height = int(rng.integers(160, 640))
    width = int(np.clip(height * rng.uniform(0.5, 1.6), 96, 800))
    bg = background(height, width, "clutter", rng)
    if not person:
        return bg
    az, el = rng.uniform(0, 2 * np.pi), math.radians(rng.uniform(-10, 35))
    target = HEAD_CENTER - np.array([0.0, 0.0, rng.uniform(0.0, 0.8)])
    radius = rng.uniform(1.5, 4.0)
    eye = target + radius * np.array([math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])
    R, t = look_at(eye, target)
    f = max(height, width) / 2 / math.tan(math.radians(rng.uniform(18, 32)))
    K = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1.0]])
    pose = head_pose_for_frame(int(rng.integers(0, 1000)), int(rng.integers(0, 1000)))
    return render(Camera("photo", K, R, t), height, width, pose, bg)["image"]


def synth_images(out_dir: str | Path, count: int = 16, seed: int = 0, person_fraction: float = 0.85,
                 progress=None) -> list[Path]:
    """Write `count` JPEG/PNG photos and labels.json ({file: has_person}); returns the paths."""
    _check_counts(count=count)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels, paths = {}, []
    for k in range(count):
        person = bool(rng.uniform() < person_fraction)
        img = synth_image(rng, person)
        fmt = "jpg" if rng.uniform() < 0.7 else "png"
        path = out / f"photo_{seed:04d}_{k:05d}.{fmt}"
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG" if fmt == "jpg" else "PNG", quality=int(rng.integers(80, 96)))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
        labels[path.name] = person
        paths.append(path)
        if progress is not None:
            progress.update(1)
    (out / "labels.json").write_text(json.dumps(labels, indent=1, sort_keys=True))
    return paths


def turnaround_cameras(n: int, height: int, width: int, radius: float = 2.2, elevation_deg: float = 10.0,
                       fov_deg: float = 34.0) -> list[Camera]:
    """`n` cameras evenly spaced on a horizontal ring around the head, all aimed at it: the
    views of a turnaround (what Pippo generates and what its reprojection error is measured on)."""
    cams = []
    el = math.radians(elevation_deg)
    target = HEAD_CENTER + np.array([0.0, 0.0, -0.35])
    f = (height / 2) / math.tan(math.radians(fov_deg / 2))
    K = np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])
    for k in range(n):
        az = 2 * math.pi * k / n
        eye = target + radius * np.array([math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])
        R, t = look_at(eye, target)
        cams.append(Camera(f"ring{k:03d}", K.copy(), R, t))
    return cams


def write_views(out_dir: str | Path, n_views: int, height: int, width: int, frame: int = 0) -> Path:
    """A rendered turnaround with its cameras in the `pippo eval reprojection` layout (SPEC §2):
    cameras.json = {"views": [{K, R, t, height, width}]} and view00.png, view01.png, ..."""
    _check_counts(n_views=n_views, height=height, width=width)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pose = head_pose_for_frame(frame)
    cams = turnaround_cameras(n_views, height, width)
    for k, cam in enumerate(cams):
        Image.fromarray(render(cam, height, width, pose)["image"]).save(out / f"view{k:02d}.png")
    records = [{"K": c.K.tolist(), "R": c.R.tolist(), "t": c.t.tolist(), "height": height, "width": width,
                "camera_id": c.id} for c in cams]
    (out / "cameras.json").write_text(json.dumps({"views": records}, indent=1))
    return out
