"""The detection stage (`detection.py [PHOTOS]`), on labelled synthetic photos (`synth-images`):

1. HOG (+ Haar faces) detections per second per core: the OpenCV backend in-process, one thread,
   on the photos as the stage sends them (at most detector.max_side);
2. the torch backend's batched throughput on CPU (one thread; the project's tiny detector with
   random weights) for batch sizes 1, 8, 32 — and on a GPU when there is one;
3. the Ray stage: one DetectorActor fed batches of 16 ÷ the same detector in-process (the
   actor round trips' cost), and 2 actors ÷ 1;
4. precision / recall of "has a person" (HOG at a few SVM-margin thresholds; 0 is the default)
   against the labels, next to the trivial baseline that keeps every photo.

Prints a markdown block for benches/RESULTS.md.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from dataprep.build_config import BuildConfig, DetectorConfig, Source
from dataprep.samples.detection import build_detector, detection_input
from dataprep.inputs.photos import decode_photo
from dataprep.studio.synth import synth_images
from dataprep.samples.tiny_detector import save_random_weights

PHOTOS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
THRESHOLDS = (-1.0, -0.5, 0.0, 0.5)


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def pr(pred: list[bool], truth: list[bool]) -> tuple[float, float]:
    tp = sum(p and t for p, t in zip(pred, truth))
    return tp / max(1, sum(pred)), tp / max(1, sum(truth))


def main():
    cv2.setNumThreads(1)
    import torch
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-detect-"))
    synth_images(tmp, count=PHOTOS, seed=11, person_fraction=0.5)
    labels = json.loads((tmp / "labels.json").read_text())
    names = sorted(labels)
    images = [detection_input(decode_photo((tmp / n).read_bytes(), 10**8).rgb, 640)[0] for n in names]
    truth = [labels[n] for n in names]
    lines = [f"## Detection stage (`benches/detection.py {PHOTOS}`)", "",
             f"{PHOTOS} synthetic photos (seed 11, {sum(truth)} with a person), 2 shared cores, "
             "one thread per detector.", ""]

    # 1. HOG (+ Haar) per core, and the best score per photo for precision / recall
    hog = build_detector(DetectorConfig(), faces=False)        # what the stage runs
    _, s = timed(hog.detect, images)
    # scored down to the lowest threshold for precision / recall (not timed)
    dets = build_detector(DetectorConfig(min_person_score=min(THRESHOLDS)), faces=False).detect(images)
    lines.append(f"- HOG people detector: **{len(images) / s:.1f} photos/s per core** "
                 f"({1000 * s / len(images):.0f} ms each, longer sides {min(max(i.shape[:2]) for i in images)}-"
                 f"{max(max(i.shape[:2]) for i in images)} px)")
    both = build_detector(DetectorConfig(), faces=True)
    _, s2 = timed(both.detect, images)
    lines.append(f"- HOG + Haar faces: {len(images) / s2:.1f} photos/s per core")

    # 2. torch backend, batched, CPU (and GPU)
    weights = save_random_weights(str(tmp / "tiny.safetensors"))
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        tiny = build_detector(DetectorConfig(backend="torch", weights=weights), faces=False, device=device)
        tiny.detect(images[:2])                     # warm-up
        rates = []
        for batch in (1, 8, 32):
            t = time.perf_counter()
            for k in range(0, len(images), batch):
                tiny.detect(images[k:k + batch])
            rates.append(f"batch {batch}: {len(images) / (time.perf_counter() - t):.1f}")
        lines.append(f"- torch backend (tiny detector, random weights) on {device}: "
                     + ", ".join(rates) + " photos/s")

    # 3. the Ray stage: actors vs in-process
    from pippo_common.ray_start import ensure_ray
    from dataprep.samples.detect_stage import start_detectors, stop_detectors
    ray = ensure_ray()
    cfg = BuildConfig(dataset=str(tmp / "ds"), sources=[Source("images", str(tmp))], crop="person",
                      detector=DetectorConfig(actors=1))
    refs = [ray.put(images[k:k + 16]) for k in range(0, len(images), 16)]
    for asked in (1, 2):
        cfg.detector.actors = asked
        actors = start_detectors(ray, cfg)         # capped to CPUs - 1 (the feeders need one)
        n = len(actors)
        ray.get([a.detect.remote(images[:1]) for a in actors])
        t = time.perf_counter()
        ray.get([actors[k % n].detect.remote(r) for k, r in enumerate(refs)])
        rate = len(images) / (time.perf_counter() - t)
        stop_detectors(ray, actors)
        lines.append(f"- Ray stage, {n} CPU actor(s) ({asked} asked), batches of 16: {rate:.1f} photos/s"
                     f" = {rate * s / len(images):.2f} × in-process")
        print(lines[-1], flush=True)

    # 4. precision / recall against the labels
    lines += ["", "| has a person? | precision | recall |", "|---|---|---|"]
    p, r = pr([True] * len(truth), truth)
    lines.append(f"| trivial baseline: keep every photo | {p:.2f} | {r:.2f} |")
    for th in THRESHOLDS:
        pred = [d.best_person is not None and d.best_person >= th for d in dets]
        p, r = pr(pred, truth)
        lines.append(f"| HOG, SVM margin ≥ {th:g}{' (default)' if th == 0 else ''} | {p:.2f} | {r:.2f} |")
    print("\n".join(lines), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
