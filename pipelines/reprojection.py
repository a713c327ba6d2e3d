"""Reprojection error of a folder of views with known cameras (`pippo eval reprojection`): the
layout pipelines.sample writes (cameras.json + view00.png, view01.png, ...), read and checked
against itself, then measured by pippo_model.metrics.reprojection."""
from __future__ import annotations

import json
from pathlib import Path

from pippo_common.errors import UserError


def read_views(directory: str | Path):
    """DIR/cameras.json ({"views": [{K, R, t, height, width}]}) and DIR/view00.png, ... ->
    (list of (H, W, 3) uint8 images, list of camera dicts), validated against each other."""
    import numpy as np

    from dataprep.inputs.image_formats import PHOTO_FORMATS, FormatError, open_image

    directory = Path(directory)
    meta = directory / "cameras.json"
    if not meta.is_file():
        raise UserError(f"{meta} not found (expected cameras.json and view00.png, view01.png, ...)")
    try:
        views = json.loads(meta.read_text())["views"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{meta}: not a {{'views': [...]}} document ({exc})") from None
    images, cameras = [], []
    for i, view in enumerate(views):
        try:
            cam = {"K": np.asarray(view["K"], np.float64), "R": np.asarray(view["R"], np.float64),
                   "t": np.asarray(view["t"], np.float64).reshape(3)}
            size = (int(view["height"]), int(view["width"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{meta}: view {i} needs K (3x3), R (3x3), t (3), height, width ({exc})") from None
        if cam["K"].shape != (3, 3) or cam["R"].shape != (3, 3):
            raise UserError(f"{meta}: view {i}: K and R must be 3x3")
        path = directory / f"view{i:02d}.png"
        if not path.is_file():
            raise UserError(f"{path} not found: cameras.json lists {len(views)} views")
        try:   # only the photo formats: never Pillow's pick from the bytes (PostScript, ...)
            with open_image(path.read_bytes(), PHOTO_FORMATS) as im:
                image = np.asarray(im.convert("RGB"))
        except FormatError as exc:
            raise UserError(f"{path}: {exc.reason}") from None
        except Exception as exc:   # PIL raises OSError, SyntaxError, DecompressionBombError, ...
            raise UserError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
        if image.shape[:2] != size:
            raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]} but cameras.json says "
                            f"{size[1]}x{size[0]}")
        images.append(image)
        cameras.append(cam)
    if len(images) < 2:
        raise UserError(f"{meta}: at least 2 views are needed, got {len(images)}")
    return images, cameras


def measure(directory: str | Path):
    """(images, the metric's result) for a views folder. NotMeasurable (views too inconsistent to
    match) is an answer, not an error: it propagates for the caller to report; any other refusal
    of the metric is one UserError naming the folder."""
    from pippo_model.metrics.reprojection import NotMeasurable, reprojection_error

    images, cameras = read_views(directory)
    try:
        return images, reprojection_error(images, cameras)
    except NotMeasurable:
        raise
    except ValueError as exc:
        raise UserError(f"{directory}: {exc}") from None
