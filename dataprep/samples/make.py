"""Inputs -> WebDataset samples (SPEC §5): studio frames and unstructured photos.

A sample is a dict of member name -> bytes plus its key; the shard writer stores it as
`{key}.{member}`. Nothing here knows about Ray or storage layout.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re

import numpy as np

from dataprep.studio.anchors import anchor_png, draw_anchor
from dataprep.build_config import BuildConfig
from dataprep.studio.capture import Capture
from pippo_common.errors import DataError
from dataprep.studio.geometry import (crop_intrinsics, plucker, project_with_depth, resize_intrinsics,
                               undistort_image)
from dataprep.inputs.photos import Photo, Rejected, apply_filters, decode_photo, encode, png, resize

HEAD_RADIUS_M = 0.12      # for sizing the face crop around the projected head


def sample_key(*parts: str, input_id: str) -> str:
    """Deterministic key, unique per input, safe for WebDataset: no '/', '..' or '.' (webdataset
    splits the member name at the first dot of the basename)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", "_".join(parts)).strip("_")[:80]
    return f"{stem}_{hashlib.sha1(input_id.encode()).hexdigest()[:10]}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def square_crop_box(h: int, w: int, centre_uv) -> tuple[int, int, int]:
    """Largest square inside the image, centred on `centre_uv` where possible: (x0, y0, side)."""
    side = min(h, w)
    u, v = centre_uv if np.all(np.isfinite(centre_uv)) else ((w - 1) / 2, (h - 1) / 2)
    x0 = int(np.clip(round(u - (side - 1) / 2), 0, w - side))
    y0 = int(np.clip(round(v - (side - 1) / 2), 0, h - side))
    return x0, y0, side


def studio_sample(capture: Capture, frame: int, cfg: BuildConfig, input_id: str) -> tuple[str, dict, dict]:
    """One frame of one capture with its views -> (key, members, info).

    Each view: undistorted (SPEC §3), cropped to a square centred on the projected head, resized
    to `cfg.resolution`, K updated by the crop and resize rules of SPEC §4. Plücker maps on the
    grid `resolution / plucker_stride` (exact rays of K resized by 1/stride), anchors drawn at the
    view's resolution. Views that cannot be read are dropped and reported in info["dropped"];
    fewer than `cfg.min_views` usable views rejects the frame.
    """
    try:
        pose = capture.head_pose(frame)
    except DataError as exc:
        raise Rejected("head_pose", str(exc)) from None
    res, stride = cfg.resolution, cfg.plucker_stride
    wanted = cfg.cameras or sorted(set(capture.cameras) | set(capture.invalid_cameras))
    key = sample_key(capture.name, f"{frame:06d}", input_id=input_id)
    members: dict[str, bytes] = {}
    views, faces, plucker_maps, dropped = [], [], [], {}
    for cam_id in wanted:
        try:
            cam = capture.camera(cam_id)
            image = capture.image(cam_id, frame)
            mask = capture.mask(cam_id, frame) if cfg.masks else None
        except DataError as exc:
            dropped[cam_id] = str(exc)
            continue
        h, w = image.shape[:2]
        if cam.distorted:
            image = undistort_image(image, cam.K, cam.dist)
            if mask is not None:
                mask = undistort_image(mask, cam.K, cam.dist, interpolation="nearest")
        head_uv, head_z = project_with_depth(cam.K, cam.R, cam.t, pose[:, 3][None])
        x0, y0, side = square_crop_box(h, w, head_uv[0])
        K = resize_intrinsics(crop_intrinsics(cam.K, x0, y0), res / side)
        vv = f"{len(views):02d}"
        view_rgb = resize(image[y0:y0 + side, x0:x0 + side], res, res)
        data, ext = encode(view_rgb, cfg.lossless, cfg.jpeg_quality)
        members[f"view{vv}.{ext}"] = data
        anchor = draw_anchor(K, cam.R, cam.t, res, res, pose, cfg.anchor_axis_m)
        members[f"view{vv}.anchor.png"] = anchor_png(anchor.image)
        if mask is not None:
            members[f"view{vv}.mask.png"] = png(resize(mask[y0:y0 + side, x0:x0 + side], res, res, nearest=True))
        plucker_maps.append(plucker(resize_intrinsics(K, 1 / stride), cam.R, cam.t, res // stride, res // stride))
        views.append({"camera_id": cam_id, "K": K.tolist(), "R": cam.R.tolist(), "t": cam.t.tolist(),
                      "height": res, "width": res, "anchor_uv": [float(v) for v in anchor.uv],
                      "anchor_behind": bool(anchor.behind[0]), "crop": [x0, y0, side]})
        if cfg.face_crop and head_z[0] > 0:
            face = face_view(image, cam, head_uv[0], head_z[0], cfg.face_resolution)
            if face is not None:
                face_rgb, K_face, box = face
                members[f"face{vv}.{ext}"] = encode(face_rgb, cfg.lossless, cfg.jpeg_quality)[0]
                faces.append({"view": len(views) - 1, "K": K_face.tolist(), "height": cfg.face_resolution,
                              "width": cfg.face_resolution, "crop": box})
    if len(views) < cfg.min_views:
        detail = "; ".join(dropped.values()) if dropped else "capture has too few cameras"
        raise Rejected("views", f"{len(views)} usable views < min_views {cfg.min_views} ({detail})")
    members["plucker.npy"] = npy_bytes(np.stack(plucker_maps).astype(np.float16))
    meta = {"kind": "studio", "capture": capture.name, "frame": int(frame), "units": "m",
            "source": input_id,
            "anchor": {"R": pose[:, :3].tolist(), "t": pose[:, 3].tolist()},
            "plucker_hw": [res // stride, res // stride], "plucker_stride": stride, "views": views}
    if faces:
        meta["face_views"] = faces
    if dropped:
        meta["dropped_views"] = dropped
    members["json"] = json.dumps(meta).encode()
    return key, members, {"dropped": dropped}


def face_view(image: np.ndarray, cam, head_uv, head_z: float, out: int):
    """Square crop around the projected head (side ≈ 3 projected head radii), resized to `out`."""
    h, w = image.shape[:2]
    if not (0 <= head_uv[0] < w and 0 <= head_uv[1] < h):
        return None                       # the head is out of this view: no face crop
    radius_px = cam.K[1, 1] * HEAD_RADIUS_M / head_z
    side = int(min(h, w, max(16, math.ceil(3 * radius_px))))
    x0 = int(np.clip(round(head_uv[0] - side / 2), 0, w - side))
    y0 = int(np.clip(round(head_uv[1] - side / 2), 0, h - side))
    K = resize_intrinsics(crop_intrinsics(cam.K, x0, y0), out / side)
    return resize(image[y0:y0 + side, x0:x0 + side], out, out), K, [x0, y0, side]


PHOTO_FOV_DEG = 55.0    # synthetic K of a photo: this field of view across its longer side


def photo_intrinsics(width: int, height: int, fov_deg: float = PHOTO_FOV_DEG) -> np.ndarray:
    """The synthetic K of an upright photo (its EXIF rarely says more): principal point at the
    centre, square pixels, `fov_deg` across the longer side (a phone's main camera is ~55-65)."""
    f = max(width, height) / 2 / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def photo_sample(data: bytes, cfg: BuildConfig, input_id: str, sha256: str, detector=None) -> tuple[str, dict]:
    """One unstructured photo -> (key, members) per SPEC §5 (`{key}.jpg` + `{key}.json`).
    When the config needs detection it runs here, in-process, with `detector` (or a cached one);
    the build batches it in Ray actors instead (dataprep.samples.detect_stage)."""
    photo = prepare_photo(data, cfg)
    detections = None
    if cfg.needs_detection():
        from dataprep.samples.detection import detection_input
        from dataprep.samples.detect_stage import local_detector
        small, back = detection_input(photo.rgb, cfg.detector.max_side)
        detections = (detector or local_detector(cfg)).detect([small])[0].scaled(back, back)
    return finish_photo_sample(photo, cfg, input_id, sha256, detections)


def prepare_photo(data: bytes, cfg: BuildConfig) -> Photo:
    """Decode and the filters that need no model (size, aspect). A photo to detect in is decoded
    at least as large as the detector sees it (people must stay larger than HOG's window)."""
    min_side = max(cfg.resolution, cfg.detector.max_side) if cfg.needs_detection() else cfg.resolution
    photo = decode_photo(data, cfg.filters.max_pixels, min_side=min_side)
    apply_filters(photo, cfg.filters)
    return photo


def finish_photo_sample(photo: Photo, cfg: BuildConfig, input_id: str, sha256: str,
                        detections=None) -> tuple[str, dict]:
    """The decoded photo and its detections (boxes in `photo.rgb` pixels, None without
    detection) -> (key, members): detection filters, the square crop (centre or around the
    chosen person), K of the stored pixels by the crop and resize rules of SPEC §4."""
    chosen = None
    if detections is not None:
        from dataprep.samples.detection import judge, square_around
        chosen = judge(detections, cfg.filters.detect_person or cfg.crop == "person", cfg.filters.detect_face)
    dh, dw = photo.rgb.shape[:2]
    if cfg.crop == "person":
        x0, y0, side = square_around(dh, dw, chosen.box, cfg.detector.margin)
    else:
        side = min(dh, dw)
        x0, y0 = (dw - side) // 2, (dh - side) // 2
    rgb = resize(photo.rgb[y0:y0 + side, x0:x0 + side], cfg.resolution, cfg.resolution)
    # The decode may have used a DCT scale (a resize by the half-pixel rule): K of the decoded
    # pixels first, then the crop and the resize, so K describes exactly the stored pixels.
    w, h = photo.upright_size
    K = resize_intrinsics(photo_intrinsics(w, h), dw / w, dh / h)
    K = resize_intrinsics(crop_intrinsics(K, x0, y0), cfg.resolution / side)
    # the crop box and detections in full-resolution upright pixels
    scale = w / dw
    box = [round(v * scale) for v in (x0, y0, side)]
    encoded, ext = encode(rgb, cfg.lossless, cfg.jpeg_quality)
    name = input_id.rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    key = sample_key("img", name.rsplit(".", 1)[0], input_id=input_id)
    meta = {"kind": "image", "source": input_id, "sha256": sha256, "width": cfg.resolution,
            "height": cfg.resolution, "orig_width": photo.orig_width, "orig_height": photo.orig_height,
            "upright_width": w, "upright_height": h, "crop": box, "source_mode": photo.mode,
            "exif_rotated": photo.exif_rotated, "K": K.tolist(), "crop_mode": cfg.crop}
    if detections is not None:
        full = detections.scaled(scale, h / dh)
        meta["detections"] = full.to_json()
        if chosen is not None:
            meta["person"] = detections.persons.index(chosen)
    return key, {ext: encoded, "json": json.dumps(meta).encode()}
