"""Build throughput on photos, measured against baselines in the same run
(`build_throughput.py [PHOTOS] [small|camera]`):

1. per-core samples/s of `pippo data build` with one Ray worker ÷ a bare loop that only decodes,
   crops, resizes and encodes the same images (PIL decode, cv2 resize and encode) — goal ≥ 0.9;
2. the build on 2 Ray workers ÷ on 1 — goal ≥ 1.8×.

Ray is started once before timing (its start-up is a fixed cost, not throughput). Each build
writes a fresh dataset, so nothing is reused between runs.
"""
import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dataprep.build.job import run_build
from pippo_common.ray_start import ensure_ray
from dataprep.build_config import BuildConfig, ShardLimits, Source
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_image

PHOTOS = int(sys.argv[1]) if len(sys.argv) > 1 else 2880
# longer side of the photos, pixels: "small" = the renderer's 200-640 px; "camera" = rescaled to
# 1000-1600 px, closer to web photos of people (where JPEG draft decoding pays off)
SIZES = {"small": None, "camera": (1000, 1600)}[sys.argv[2] if len(sys.argv) > 2 else "small"]
RESOLUTION = 256


def make_corpus(out: Path) -> list[Path]:
    """PHOTOS distinct JPEGs from 24 rendered photos: each a random crop at a random quality,
    with a marker block, so files differ in bytes and, as in real collections, mostly in size."""
    rng = np.random.default_rng(0)
    bases = []
    while len(bases) < 24:
        img = synth_image(rng)
        if min(img.shape[:2]) >= 200:
            bases.append(img)
    out.mkdir()
    paths = []
    for k in range(PHOTOS):
        base = bases[k % len(bases)]
        h, w = base.shape[:2]
        dy, dx = rng.integers(0, h // 10 + 1), rng.integers(0, w // 10 + 1)
        img = base[dy:h - rng.integers(0, h // 10 + 1), dx:w - rng.integers(0, w // 10 + 1)].copy()
        if SIZES:
            side = rng.integers(*SIZES)
            scale = side / max(img.shape[:2])
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_CUBIC)
        img[:8, :8] = (k % 256, k // 256 % 256, 7)     # an 8×8 block survives JPEG: unique bytes
        path = out / f"p{k:05d}.jpg"
        Image.fromarray(img).save(path, "JPEG", quality=int(rng.integers(82, 96)))
        paths.append(path)
    return paths


def bare_loop(paths):
    for p in paths:
        rgb = np.asarray(Image.open(io.BytesIO(p.read_bytes())).convert("RGB"))
        h, w = rgb.shape[:2]
        s = min(h, w)
        crop = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        small = cv2.resize(crop, (RESOLUTION, RESOLUTION), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


def build(src: Path, dataset: Path, workers: int) -> float:
    cfg = BuildConfig(dataset=str(dataset), sources=[Source("images", str(src))], resolution=RESOLUTION,
                      partitions=2, workers=workers, parent=None, preview_samples=4,
                      shard=ShardLimits(max_samples=500))
    start = time.perf_counter()
    vid = run_build(cfg, {})
    elapsed = time.perf_counter() - start
    stats = DatasetStore(str(dataset)).resolve(vid)["stats"]
    print(f"  build on {workers} worker(s): {elapsed:.2f} s, {stats['samples']} samples, "
          f"{stats['inputs_prehashed']} inputs read twice (size shared with another input)")
    return elapsed


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_corpus(tmp / "photos")
        ensure_ray()
        build(tmp / "photos", tmp / "warmup", 2)            # warm Ray workers and imports
        bare_loop(paths[:50])
        start = time.perf_counter()
        bare_loop(paths)
        t_bare = time.perf_counter() - start
        t1 = build(tmp / "photos", tmp / "one", 1)
        t2 = build(tmp / "photos", tmp / "two", 2)
    print(f"{PHOTOS} photos ({sys.argv[2] if len(sys.argv) > 2 else 'small'}) -> {RESOLUTION}px: bare loop {PHOTOS / t_bare:.1f}/s on 1 core; "
          f"build 1 worker {PHOTOS / t1:.1f}/s; build 2 workers {PHOTOS / t2:.1f}/s")
    print(f"build per core / bare loop: {t_bare / t1:.2f}  (goal >= 0.9)")
    print(f"build 2 workers / 1 worker: {t1 / t2:.2f}x  (goal >= 1.8)")


if __name__ == "__main__":
    main()
