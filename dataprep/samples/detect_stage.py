"""The detection stage of the build: detector models in Ray actors, fed in batches by the process
tasks (dataprep/build/partition_job.py).

Plain actors rather than a Ray Data actor pool: the build's process task reads each input once
(sha256, decode, sample) and the detections are needed in the middle of that, so a task sends
its decoded photos (downscaled to detector.max_side) to an actor and keeps one batch in flight
while it decodes the next. A Ray Data pipeline would have to carry the decoded pixels (or
re-read the inputs) between two datasets; benches/detection.py measures the actor stage.

Each actor loads its model once. On a cluster with GPUs the torch backend gets one actor per GPU
(`num_gpus=1`); otherwise actors take one CPU each, half the cluster's CPUs by default (the
other half decode and encode) and never all of them. A process task uses actor `p % actors`.
"""
from __future__ import annotations

import logging

from dataprep.build_config import BuildConfig
from dataprep.samples.detection import build_detector, detection_input
from pippo_common.errors import DataError
from dataprep.inputs.photos import Rejected

log = logging.getLogger("pippo.data.detect")

_LOCAL: dict[str, object] = {}


def local_detector(cfg: BuildConfig):
    """The detector of `cfg`, loaded once per process (in-process use: `pippo sample`, tests)."""
    key = repr((cfg.detector, cfg.filters.detect_face))
    if key not in _LOCAL:
        _LOCAL.clear()
        _LOCAL[key] = build_detector(cfg.detector, faces=cfg.filters.detect_face)
    return _LOCAL[key]


class DetectorActor:
    """One loaded model; `detect` a batch of RGB uint8 photos -> Detections per photo."""

    def __init__(self, cfg: BuildConfig, use_gpu: bool):
        import cv2
        cv2.setNumThreads(1)        # one CPU per actor (a GPU actor's work is on its GPU)
        if cfg.detector.backend == "torch":
            import torch
            torch.set_num_threads(1)
        self.error = None
        try:
            self.detector = build_detector(cfg.detector, faces=cfg.filters.detect_face,
                                           device="cuda" if use_gpu else "cpu")
        except DataError as exc:     # reported by ready(): one line for the user, not a traceback
            self.error = str(exc)

    def ready(self) -> str | None:
        return self.error

    def detect(self, images):
        return self.detector.detect(images)


def start_detectors(ray, cfg: BuildConfig) -> list:
    """The stage's actors, started and their models loaded (a bad model or weights: DataError)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and cfg.detector.backend == "torch":
        n, options = cfg.detector.actors or gpus, {"num_gpus": 1, "num_cpus": 1}
    else:
        cpus = int(resources.get("CPU", 1))
        n, options = cfg.detector.actors or max(1, cpus // 2), {"num_cpus": 1}
        if n > cpus - 1:
            # actors hold their CPU for the whole stage: at least one must stay for the process
            # tasks that feed them, or nothing is ever scheduled (a one-CPU cluster
            # oversubscribes its single actor instead)
            log.warning("detection: %d actor(s) asked for, %d CPU(s): using %d", n, cpus, max(1, cpus - 1))
            n = max(1, cpus - 1)
            if cpus < 2:
                options = {"num_cpus": 0}
    cls = ray.remote(max_restarts=2, max_task_retries=2)(DetectorActor)
    actors = [cls.options(**options).remote(cfg, "num_gpus" in options) for _ in range(n)]
    errors = [e for e in ray.get([a.ready.remote() for a in actors]) if e]
    if errors:
        stop_detectors(ray, actors)
        raise DataError(errors[0])
    log.info("detection: %d %s actor(s)%s", n, cfg.detector.backend, " on GPUs" if "num_gpus" in options else "")
    return actors


def stop_detectors(ray, actors: list) -> None:
    for a in actors:
        ray.kill(a)


class DetectionBatcher:
    """Collects decoded photos of a process task and detects them in batches on an actor (or
    in-process when `actor` is None), one batch in flight while the task decodes the next.

    `add(item, rgb)` and `flush()` return the finished (item, detections-or-Rejected) pairs;
    detections are in `rgb`'s pixels."""

    def __init__(self, cfg: BuildConfig, actor=None):
        self.cfg, self.actor = cfg, actor
        self.pending: list = []
        self.in_flight = None        # (ref, items) sent to the actor, not yet collected

    def add(self, item, rgb) -> list:
        small, back = detection_input(rgb, self.cfg.detector.max_side)
        self.pending.append((item, small, back))
        return self._send() if len(self.pending) >= self.cfg.detector.batch_size else []

    def flush(self) -> list:
        done = self._send()
        return done + self._collect()

    def _send(self) -> list:
        batch, self.pending = self.pending, []
        if self.actor is None:
            return self._finish(batch, local_detector(self.cfg).detect([s for _, s, _ in batch])) if batch else []
        done = self._collect()
        if batch:
            self.in_flight = (self.actor.detect.remote([s for _, s, _ in batch]), batch)
        return done

    def _collect(self) -> list:
        if self.in_flight is None:
            return []
        import ray
        ref, batch = self.in_flight
        self.in_flight = None
        try:
            results = ray.get(ref)
        except Exception as exc:     # the actor died past its restarts: these photos fail (retried later)
            reason = f"detector failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return [(item, Rejected("error", reason)) for item, _, _ in batch]
        return self._finish(batch, results)

    @staticmethod
    def _finish(batch, results) -> list:
        return [(item, det.scaled(back, back)) for (item, _, back), det in zip(batch, results)]
