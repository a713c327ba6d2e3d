"""Training-data loader throughput vs what a training step consumes (`loader.py [--batches N]`).

The test preset of the stages mid and post: 128 px, 4 target views, batch 4 per rank. A small
version of synthetic studio captures is built first (Ray, 128 px, Plücker stride 16 -> 8x8 grid,
face crops), then:

1. loader: samples/s of `TrainingLoader` (2 DataLoader workers, the default), after warm-up; by
   range reads of the members a stage needs, and with `--streaming` also streaming whole tars
   (the path of shard indexes without byte offsets) as the baseline of the same run;
2. training: samples/s of a plain torch training step of `pippo_model.config.test()` for the stage
   (build_model, diffusion.training_loss, AdamW) on random tensors of the same batch in model space
   (latents 16x16x4, anchors as latents, Plücker maps at the version's grid);
3. the ratio loader / training — goal >= 10, so data loading never starves a rank. Both run on
   this machine's CPU cores one after the other; on a training node the loader has its own cores.
   Wall-clock rates suffer from other jobs on a shared machine, so CPU milliseconds per sample
   are printed too (loader: in one process, no workers; training: both torch threads), and their
   ratio ("per CPU second": samples the loader prepares for the CPU one training sample costs),
   and the CPU µs per sample of reading the shards alone (ShardReader, best of 5: the part that
   range reads change).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import torch

from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, ShardLimits, Source
from dataprep.loader import STAGE_KIND, DataSource, LoaderConfig, TrainingLoader
from dataprep.store.shard_reader import ShardReader
from dataprep.store.core import DatasetStore
from dataprep.studio.synth import synth_capture
from pippo_model import config as C
from pippo_model.diffusion import CosineSchedule, training_loss
from pippo_model.model import build_model

BATCH, VIEWS, RES, STRIDE = 4, 4, 128, 16


def build_version(root: Path) -> str:
    """3 captures x 8 frames x 8 cameras rendered at 192x128 -> a 128 px version with face crops."""
    for k in range(3):
        synth_capture(root / "caps" / f"c{k}", cameras=8, frames=8, height=192, width=128, seed=20 + k)
    cfg = BuildConfig(dataset=str(root / "ds"), sources=[Source("captures", str(root / "caps"))],
                      resolution=RES, plucker_stride=STRIDE, face_crop=True, face_resolution=64,
                      partitions=2, shard=ShardLimits(max_samples=8))
    return f"{root / 'ds'}@{run_build(cfg, {})}"


def loader_run(dataset: str, stage: str, batches: int, range_reads: bool, workers: int = 2) -> tuple[float, float]:
    """(samples/s after warm-up, CPU seconds of this process over the timed batches)."""
    cfg = LoaderConfig(batch_size=BATCH, num_workers=workers, resolution=RES, views=VIEWS,
                       face_views=1 if stage == "post" else 0, range_reads=range_reads)
    it = iter(TrainingLoader([DataSource(dataset)], stage, cfg))
    for _ in range(4):                       # warm-up: worker start, first shard reads
        next(it)
    start, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - start)
    cpu = time.process_time() - cpu0
    it.close()
    return rate, cpu


def loader_rate(dataset: str, stage: str, batches: int, range_reads: bool = True) -> tuple[float, float]:
    """Samples/s with 2 DataLoader workers (best of two runs), and CPU ms per sample of the whole
    pipeline (read, decode, collate) measured with no workers: DataLoader workers start from a
    forkserver, so their CPU time is not this process's children's and could not be counted."""
    rate = max(loader_run(dataset, stage, batches, range_reads)[0] for _ in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as in a DataLoader worker (and cv2: one thread)
    cv2.setNumThreads(1)
    try:
        _, cpu = loader_run(dataset, stage, batches, range_reads, workers=0)
    finally:
        torch.set_num_threads(threads)
    return rate, cpu / (batches * BATCH) * 1e3


def read_cost(dataset: str, stage: str, range_reads: bool, repeats: int = 5) -> float:
    """CPU µs per sample of reading alone (no decoding): every sample of the stage's kind from
    every shard through the loader's ShardReader, best of `repeats` (the least disturbed)."""
    uri, vid = dataset.rsplit("@", 1)
    store = DatasetStore(uri)
    shards = store.version_shards(store.resolve(vid))
    wanted = [[k for k, kind in zip(*store.shard_index(s).to_pydict().values()) if kind == STAGE_KIND[stage]]
              for s in shards]
    best = float("inf")
    for _ in range(repeats):
        reader = ShardReader(stage, range_reads)     # a fresh index cache: its reads count once
        cpu0, n = time.process_time(), 0
        for shard, keys in zip(shards, wanted):
            n += sum(1 for _ in reader.samples(store, shard, set(keys)))
        best = min(best, (time.process_time() - cpu0) / n * 1e6)
    return best


def training_rate(stage: str, steps: int) -> float:
    torch.manual_seed(0)
    cfg = C.test(resolution=RES, views=VIEWS).for_stage(stage)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    h, c, g = cfg.latent_size, cfg.latent_channels, RES // STRIDE
    batch = {"views": torch.randn(BATCH, VIEWS, c, h, h), "reference": torch.randn(BATCH, c, h, h),
             "cameras": torch.randn(BATCH, VIEWS, 16)}
    if stage == "post":
        batch.update(plucker=torch.randn(BATCH, VIEWS, 6, g, g), anchor=torch.randn(BATCH, VIEWS, c, h, h))
    schedule = CosineSchedule()

    def step():
        opt.zero_grad(set_to_none=True)
        training_loss(model, schedule, batch).backward()
        opt.step()

    step()                                   # warm-up (allocations)
    times, cpu0 = [], time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu0) / (steps * BATCH) * 1e3
    return BATCH / min(times), cpu_ms        # the best step: its uncontended value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="timed loader batches per stage")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per stage (best kept)")
    parser.add_argument("--streaming", action="store_true",
                        help="also measure the loader streaming whole tars (range_reads=False, the path "
                             "of indexes without byte offsets): the baseline, in the same run")
    args = parser.parse_args()
    os.environ["RAY_ADDRESS"] = ""           # a local Ray for the build, never a stray cluster
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dataset = build_version(Path(tmp))
        print(f"built {dataset.rsplit('@', 1)[1]} in {time.perf_counter() - start:.1f} s")
        for stage in ("mid", "post"):
            train, train_cpu = training_rate(stage, args.steps)
            for range_reads in (True, False) if args.streaming else (True,):
                load, load_cpu = loader_rate(dataset, stage, args.batches, range_reads)
                how = "range reads" if range_reads else "streaming"
                print(f"{stage:>4} ({how}): batch {BATCH}, {RES} px, {VIEWS} views: loader {load:.0f} samples/s "
                      f"({load_cpu:.2f} CPU ms/sample, of which reading {read_cost(dataset, stage, range_reads):.0f} "
                      f"µs), training step {train:.1f} samples/s ({train_cpu:.1f} "
                      f"CPU ms/sample); ratio {load / train:.1f} (goal >= 10), per CPU second "
                      f"{train_cpu / load_cpu:.1f}", flush=True)


if __name__ == "__main__":
    main()
