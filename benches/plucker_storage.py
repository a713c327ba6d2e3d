"""Stored Plücker + anchor bytes ÷ image bytes per view, and the angular error of stored rays,
at 256 and 1024 px for several strides: which stride/encoding meets ≤ 0.25 and ≤ 1e-3 rad.

Views come from a synthetic capture rendered at 1600×1040 and built exactly as the build job
does (undistort, crop on the head, resize, JPEG q92, float16 Plücker, PNG anchors). The error is
measured two ways: at the stored grid points (float16 rounding only) and at EVERY pixel of the
view after bilinear upsampling of the stored grid (what a model consuming it at full res sees).
"""
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataprep.build_config import BuildConfig, Source
from dataprep.studio.capture import Capture
from dataprep.studio.geometry import ray_directions
from dataprep.samples.make import studio_sample
from dataprep.studio.synth import synth_capture


def angle(a, b):
    cos = np.clip((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1), -1, 1)
    return np.arccos(cos)


def measure(cap, res, stride):
    cfg = BuildConfig(dataset="unused", sources=[Source("captures", "unused")], resolution=res,
                      plucker_stride=stride, masks=False)
    _, members, _ = studio_sample(cap, cap.frames[0], cfg, "bench")
    meta = json.loads(members["json"])
    P = np.load(io.BytesIO(members["plucker.npy"]))
    views = len(meta["views"])
    image_bytes = sum(len(members[f"view{v:02d}.jpg"]) for v in range(views)) / views
    plucker_bytes = len(members["plucker.npy"]) / views
    anchor_bytes = sum(len(members[f"view{v:02d}.anchor.png"]) for v in range(views)) / views
    grid_err = full_err = 0.0
    for v, view in enumerate(meta["views"]):
        K, R, t = (np.array(view[k]) for k in ("K", "R", "t"))
        stored = P[v, :3].astype(np.float32)
        # exact rays at the coarse pixel centres (SPEC §4: K resized by 1/stride)
        from dataprep.studio.geometry import resize_intrinsics
        exact_grid = ray_directions(resize_intrinsics(K, 1 / stride), R, t, res // stride, res // stride)
        grid_err = max(grid_err, angle(stored.transpose(1, 2, 0), exact_grid).max())
        # bilinear upsampling with align_corners=False puts coarse centres where the half-pixel rule does
        up = F.interpolate(torch.from_numpy(stored)[None], size=(res, res), mode="bilinear", align_corners=False)[0]
        exact_full = ray_directions(K, R, t, res, res)
        inner = slice(stride, res - stride)     # bilinear extrapolates at the outer half cell
        full_err = max(full_err, angle(up.numpy().transpose(1, 2, 0)[inner, inner], exact_full[inner, inner]).max())
    return image_bytes, plucker_bytes, anchor_bytes, grid_err, full_err


def main():
    with tempfile.TemporaryDirectory() as tmp:
        cap = Capture(str(synth_capture(Path(tmp) / "cap", cameras=3, frames=1, height=1600, width=1040, seed=7)))
        print(f"{'res':>5} {'stride':>6} {'grid':>5} {'image B':>9} {'plücker B':>9} {'anchor B':>9} "
              f"{'ratio':>6} {'err grid rad':>12} {'err full rad':>12}")
        for res, strides in ((256, (4, 8, 16, 32)), (1024, (8, 16, 32, 64))):
            for stride in strides:
                img, pl, an, eg, ef = measure(cap, res, stride)
                ok = "ok" if (pl + an) / img <= 0.25 and max(eg, ef) <= 1e-3 else "  "
                print(f"{res:>5} {stride:>6} {res // stride:>5} {img:>9.0f} {pl:>9.0f} {an:>9.0f} "
                      f"{(pl + an) / img:>6.3f} {eg:>12.2e} {ef:>12.2e} {ok}")


if __name__ == "__main__":
    main()
