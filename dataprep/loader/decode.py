"""Per-stage decoding of a shard sample into the training loader's contract (dataprep/loader/training_loader.py
documents the batch fields): pretrain augments a photo, mid picks a frontal reference, post adds
Plücker maps, anchors and face crops as extra-scale views with exact cameras."""
from __future__ import annotations

import io
import json
import math

from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from dataprep.studio.anchors import draw_anchor
from pippo_common.errors import DataError
from dataprep.studio.geometry import camera_center, plucker, resize_intrinsics
from dataprep.inputs.image_formats import sniff
from dataprep.loader.splits import _split_hash

if TYPE_CHECKING:
    from dataprep.loader.config import LoaderConfig

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
FACE_AXIS = 1            # head-local +y is the face (dataprep/loader/training_loader.py docstring)


def _image(raw: dict, stem: str = "") -> np.ndarray:
    """RGB uint8 of the image member `{stem}.jpg` (png, ...) of a sample; the photo if no stem."""
    data = next((raw[n] for n in (f"{stem}.{e}" if stem else e for e in IMAGE_EXTS) if n in raw), None)
    # our shards hold JPEG and PNG only; anything else (cv2 would also decode JPEG 2000, HDR, PFM,
    # Sun raster...) is refused before a decoder sees it
    ok = data is not None and sniff(data, ("JPEG", "PNG")) is not None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if ok else None
    if img is None:
        raise DataError(f"sample {raw['__key__']}: image member {stem or '(photo)'} missing or undecodable")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (side, side):
        return img
    interp = cv2.INTER_AREA if side < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (side, side), interpolation=interp)


def _random_resized_crop(img, side: int, rng, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    h, w = img.shape[:2]
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = _resize(img[y0:y0 + ch, x0:x0 + cw], side)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _colour_jitter(img, rng, strength: float = 0.2) -> np.ndarray:
    x = img.astype(np.float32) / 255.0 * rng.uniform(1 - strength, 1 + strength)         # brightness
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)                     # saturation
    x = x.mean() + (x - x.mean()) * rng.uniform(1 - strength, 1 + strength)             # contrast
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def frontal_view(meta: dict, allowed=None) -> int:
    """Index of the view (among `allowed`, default all) whose camera lies most in front of the
    face (module docstring)."""
    head_R, head_t = np.asarray(meta["anchor"]["R"], np.float64), np.asarray(meta["anchor"]["t"], np.float64)
    forward = head_R[:, FACE_AXIS]
    allowed = range(len(meta["views"])) if allowed is None else allowed
    scores = {}
    for i in allowed:
        v = meta["views"][i]
        d = camera_center(v["R"], v["t"]) - head_t
        scores[i] = float(forward @ d) / max(float(np.linalg.norm(d)), 1e-12)
    return max(scores, key=lambda i: (scores[i], -i))


def heldout_views(meta: dict, fraction: float) -> list[int]:
    """Indices of the sample's views whose CAMERA is held out: round(fraction x views) cameras (at
    least 1, leaving at least 2), picked in pairs of neighbours: a camera by the hash order of the
    ids (dataprep.loader.split_name's sha1), then the camera whose optical axis is nearest to its.
    A pure function of the rig (ids and orientations, the same at every frame), so those cameras
    are never seen in training at any frame; in pairs, because the reprojection error of novel
    views needs two that see the same side of the subject (random picks often face away)."""

    n = len(meta["views"])
    if fraction <= 0 or n < 3:
        return []
    count = min(max(1, round(fraction * n)), n - 2)
    ids = [str(v.get("camera_id", i)) for i, v in enumerate(meta["views"])]
    axes = np.stack([np.asarray(v["R"], np.float64)[2] for v in meta["views"]])
    held: list[int] = []
    for i in sorted(range(n), key=lambda k: (_split_hash(ids[k]), ids[k])):
        if len(held) >= count:
            break
        if i in held:
            continue
        held.append(i)
        rest = [k for k in range(n) if k not in held]
        if len(held) < count and rest:
            held.append(max(rest, key=lambda k: (float(axes[k] @ axes[i]), ids[k])))
    return sorted(held)


def orbit_views(meta: dict) -> np.ndarray:
    """All view indices ordered by the azimuth of their camera about the head (world z up)."""
    head_t = np.asarray(meta["anchor"]["t"], np.float64)
    az = [math.atan2(*(camera_center(v["R"], v["t"]) - head_t)[[0, 1]]) for v in meta["views"]]
    return np.argsort(az, kind="stable").astype(np.int64)


def neighbouring_views(meta: dict, candidates, count: int) -> np.ndarray:
    """`count` of the candidate views that see the head from the closest directions: the closest
    pair first, then the candidate nearest to one already chosen (repeated cyclically when there are
    fewer). Evaluation targets: the reprojection error is measured on pairs that see the same side
    of the subject, and random held-out cameras would often face opposite sides (nothing to match)."""
    head_t = np.asarray(meta["anchor"]["t"], np.float64)
    cands = sorted(candidates)
    dirs = np.stack([camera_center(meta["views"][v]["R"], meta["views"][v]["t"]) - head_t for v in cands])
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True).clip(1e-12)
    cos = dirs @ dirs.T
    np.fill_diagonal(cos, -np.inf)
    if len(cands) == 1:
        return np.full(count, cands[0], np.int64)
    i, j = np.unravel_index(int(np.argmax(cos)), cos.shape)
    chosen = [int(min(i, j)), int(max(i, j))]
    while len(chosen) < min(count, len(cands)):
        rest = [k for k in range(len(cands)) if k not in chosen]
        chosen.append(max(rest, key=lambda k: (cos[k, chosen].max(), -k)))
    return np.resize(np.asarray([cands[k] for k in chosen], np.int64), count)


def choose_targets(n: int, count: int, reference: int, rng, candidates=None) -> np.ndarray:
    """`count` target view indices of n views (module docstring: mid), drawn from `candidates`
    (default all n views)."""
    pool = np.arange(n) if candidates is None else np.asarray(sorted(candidates))
    others = np.array([v for v in pool if v != reference])
    if len(others) >= count:
        return rng.choice(others, count, replace=False)
    if len(pool) >= count:
        return rng.choice(pool, count, replace=False)
    return np.resize(rng.permutation(pool), count)


def _pretrain_sample(raw: dict, cfg: LoaderConfig, rng, augment: bool) -> dict:
    img = _image(raw)
    if augment:
        target = _random_resized_crop(img, cfg.resolution, rng)
        reference = _colour_jitter(_random_resized_crop(img, cfg.resolution, rng), rng)
    else:
        target = reference = _resize(img, cfg.resolution)
    return {"views": target[None], "reference": reference,
            "_view_index": np.zeros(1, np.int64), "_face": np.zeros(1, bool), "_reference_index": -1}


def _face_slots(targets, faces: dict, count: int) -> np.ndarray:
    """The first `count` target slots whose camera has a face crop."""
    slots = [k for k, v in enumerate(targets) if v in faces][:count]
    return np.isin(np.arange(len(targets)), slots)


def _studio_sample(raw: dict, meta: dict, post: bool, cfg: LoaderConfig, axis_m: float, rng,
                   split: str = "train") -> dict:
    """split "train": reference and targets from the kept cameras only; "heldout": the reference
    from the kept cameras, the targets at the held-out ones (all cameras when none is held out);
    "orbit": the reference as in "heldout", the targets every camera by azimuth (`orbit_views`)."""
    res, views = cfg.resolution, meta["views"]
    held = heldout_views(meta, cfg.holdout_cameras)
    kept = [i for i in range(len(views)) if i not in held]
    if not kept:                               # a one-camera sample: nothing to hold out
        held, kept = [], list(range(len(views)))
    ref = frontal_view(meta, kept)
    if split == "orbit":            # every camera by azimuth about the head: a turnaround
        targets = orbit_views(meta)[:cfg.views]
        targets = np.resize(targets, cfg.views)
    elif split == "heldout" and held:
        targets = neighbouring_views(meta, held, cfg.views)
    else:
        targets = choose_targets(len(views), cfg.views, ref, rng, candidates=kept)
    faces = {f["view"]: f for f in meta.get("face_views", [])} if post else {}
    is_face = _face_slots(targets, faces, cfg.face_views)
    out = {"views": np.stack([_resize(_image(raw, f"{'face' if f else 'view'}{v:02d}"), res)
                              for v, f in zip(targets, is_face)]),
           "reference": _resize(_image(raw, f"view{ref:02d}"), res),
           "_view_index": targets.astype(np.int64), "_face": is_face, "_reference_index": ref,
           "_heldout_camera": np.isin(targets, held)}
    # the SPEC camera of each target; the camera MLP's vectors are made on the model side
    # (pipelines.training.engine.camera_inputs), never here
    out["_K"] = np.stack([_delivered_K(faces[v] if f else views[v], res) for v, f in zip(targets, is_face)])
    out["_R"] = np.array([views[v]["R"] for v in targets], dtype=np.float64)
    out["_t"] = np.array([views[v]["t"] for v in targets], dtype=np.float64)
    # head-to-world pose: evaluation redraws anchors for a wrong camera (the camera control)
    out["_head"] = np.concatenate([np.asarray(meta["anchor"]["R"], np.float64),
                                   np.asarray(meta["anchor"]["t"], np.float64)[:, None]], axis=1)
    if post:
        stored = np.load(io.BytesIO(raw["plucker.npy"]), allow_pickle=False)
        pose = np.concatenate([np.asarray(meta["anchor"]["R"]), np.asarray(meta["anchor"]["t"])[:, None]], axis=1)
        controls = [_controls(raw, meta, v, faces[v] if f else None, stored, pose, res, axis_m)
                    for v, f in zip(targets, is_face)]
        out["plucker"] = np.stack([c[0] for c in controls])
        out["anchor"] = np.stack([c[1] for c in controls])
    return out


def _delivered_K(src: dict, res: int) -> np.ndarray:
    """K of a stored view (or face crop) `src` after `_resize` to res x res (SPEC §4 resize rule)."""
    return resize_intrinsics(src["K"], res / src["width"], res / src["height"])


def _controls(raw, meta, v: int, face: dict | None, stored, pose, res: int, axis_m: float):
    """(Plücker (6, h, w) float32, anchor (R, R, 3) uint8) of view v, or of its face crop."""
    cam = meta["views"][v]
    R, t = np.asarray(cam["R"], np.float64), np.asarray(cam["t"], np.float64)
    K = _delivered_K(face or cam, res)
    if face is None:
        rays = stored[v].astype(np.float32)
        if (cam["height"], cam["width"]) == (res, res):
            return rays, _stored_anchor(raw, v)
    else:
        gh, gw = meta["plucker_hw"]
        rays = plucker(resize_intrinsics(K, gw / res, gh / res), R, t, gh, gw)
    return rays, draw_anchor(K, R, t, res, res, pose, axis_m).image.transpose(1, 2, 0)


def _stored_anchor(raw: dict, v: int) -> np.ndarray:
    """Anchor of view v as HWC uint8: the per-view palette PNG, or the (V, 3, H, W) anchor.npy."""
    name = f"view{v:02d}.anchor.png"
    if name in raw:
        return np.asarray(Image.open(io.BytesIO(raw[name]), formats=["PNG"]).convert("RGB"))
    return np.load(io.BytesIO(raw["anchor.npy"]), allow_pickle=False)[v].transpose(1, 2, 0)


def decode_sample(raw: dict, stage: str, cfg: LoaderConfig, axis_m: float, rng, augment: bool,
                  split: str = "train") -> dict:
    """One raw webdataset sample (member -> bytes) -> the per-sample arrays of a batch; split
    "heldout" puts a studio sample's targets at its held-out cameras (evaluation)."""
    if stage == "pretrain":
        out = _pretrain_sample(raw, cfg, rng, augment)
    else:
        out = _studio_sample(raw, json.loads(raw["json"]), stage == "post", cfg, axis_m, rng, split)
    out["key"] = raw["__key__"]
    return out


