"""The training-data loader: dataset versions (`URI@REF`) -> an infinite stream of batches.

Batch contract (the one place it is written down). Pixel space, float32, B = batch, V = target
views, R = cfg.resolution:

    "views"      (B, V, 3, R, R) in [-1, 1]   target views (pretrain: V = 1)
    "reference"  (B, 3, R, R) in [-1, 1]      the reference image
    "plucker"    (B, V, 6, h, w)              post: Plücker rays [d, o x d] of the targets on the
                                              version's stored grid (h, w) = json `plucker_hw`
    "anchor"     (B, V, 3, R, R) in [-1, 1]   post: spatial anchors of the targets
    "keys"       list of B sample keys
    internal (the trainer ignores them): "_source", "_epoch", "_position" (B,) int64: where each
    sample sits in the position space below; "_view_index" (B, V) int64: each target's index in the
    sample's json "views"; "_face" (B, V) bool: the target is that view's face crop;
    "_reference_index" (B,) int64: the view used as reference (-1 in pretrain); mid, post:
    "_heldout_camera" (B, V) bool: the target's camera is held out (cfg.holdout_cameras), "_head"
    (B, 3, 4) float64: the head-to-world pose, "_K"
    (B, V, 3, 3), "_R" (B, V, 3, 3), "_t" (B, V, 3) float64: each target's camera (SPEC §4, world
    = the sample's frame) with K describing the DELIVERED R x R pixels (face crops included), so
    the views of a batch can be measured geometrically (reprojection error in evaluation).
    The loader delivers the SPEC quantities only (pixels, K, R, t, Plücker maps, anchors): the
    camera MLP's vectors are made from "_R", "_t" on the model side
    (pipelines.training.engine.to_model_space), the same for training, evaluation and sampling.

Stages (a sample's kind comes from the shard index, so filtering happens before any read):
- pretrain: "image" samples. Target = random-resized crop (35-100 % of the area, aspect 3/4-4/3)
  + flip; reference = an independent crop + flip + colour jitter (brightness, saturation,
  contrast ±20 %), so the model cannot copy pixels; both seeded by (seed, epoch, key).
  cfg.augment=False: both are the photo resized to R.
- mid: "studio" samples. The reference is the FRONTAL view (below); V targets are drawn (seeded by
  (seed, epoch, key)) without replacement from the other views; from all views, reference
  included, when fewer than V others exist; when the sample has N < V views, all N in a random
  order repeated cyclically (each view floor(V/N) or ceil(V/N) times). Views are resized to R.
- post: as mid, plus Plücker maps (the stored float16 ones) and anchors (the stored palette PNGs;
  redrawn with `draw_anchor` when R is not the stored side). With cfg.face_views = F > 0, the first
  F target slots whose camera has a face crop carry that crop instead: resized to R, its K resized
  by the SPEC §4 rule, its Plücker map computed on the same (h, w) grid, its anchor drawn at R.

Frontal view: dataprep.studio.synth textures the head in local axes "x right, y front, z up" and `_face`
paints the face around azimuth 0, i.e. head +y; the pose is head-to-world, so the face looks along
f = R_head[:, 1]. The reference is the view whose camera centre o = -Rᵀt lies most in front of
it: argmax f · (o - t_head) / |o - t_head| (every camera aims at the head).

Positions and splitting. Per source and epoch e, the usable samples (stage kind, not held out) are
numbered 0..N-1 along the shards in an order seeded by (seed, e, version), tar order within a
shard. The positions not consumed yet are cut into world_size contiguous ranges (sizes differ by
at most one), each into num_workers sub-ranges; a worker reads only the shards its sub-range
touches, reading only its samples' members the stage needs (by byte offsets from the shard
index, dataprep/store/shard_reader.py; older indexes: streaming the tar), through a shuffle buffer
seeded by (seed, e, rank, worker, version) and flushed at the end of the epoch, then goes on with
e+1. Sources mix per sample: a seeded choice per (rank, worker), probability ∝ weight.

State: the main process records (source, epoch, position) of every sample it yields.
`state_dict()` is that set plus the state the loader started from, per version, as run-length
blocks [epoch_from, epoch_to, ranges]: each epoch in [from, to) consumed exactly `ranges` ([a, b)
lists), so it stays small (whole epochs fold into one block; holes only near the shuffle buffers).
A loader built from a merged state serves every epoch's complement, cut anew for its own world
size and workers. Each `iter()` replays the stream from the state the loader was built with.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataprep.loader.config import DataSource, LoaderConfig
from dataprep.loader.decode import decode_sample
from dataprep.loader.splits import _key_hash, holdout_set, split_name
from dataprep.store.shard_reader import ShardReader
from dataprep.store.core import DatasetStore, split_ref
from pippo_common.errors import DataError

log = logging.getLogger("pippo.data.loader")

STAGE_KIND = {"pretrain": "image", "mid": "studio", "post": "studio"}
STATE_FORMAT = 1
HELDOUT_SALT = 0x5EED
IMAGE_FIELDS = ("views", "reference", "anchor")     # uint8 HWC per sample, float32 CHW per batch


# ---- position ranges: sorted, disjoint, non-adjacent [a, b) lists ---------------------------------

def _normalize(ranges) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _count(ranges) -> int:
    return sum(b - a for a, b in ranges)


def _complement(ranges, n: int) -> list[list[int]]:
    out, prev = [], 0
    for a, b in ranges:
        if a > prev:
            out.append([prev, a])
        prev = b
    return out + [[prev, n]] if prev < n else out


def _slice(ranges, lo: int, hi: int) -> list[list[int]]:
    """The members of `ranges` ranked lo..hi-1 in ascending order, as ranges."""
    out, seen = [], 0
    for a, b in ranges:
        s, e = max(lo - seen, 0), min(hi - seen, b - a)
        if s < e:
            out.append([a + s, a + e])
        seen += b - a
        if seen >= hi:
            break
    return out


def _share(n: int, parts: int, k: int) -> tuple[int, int]:
    """Part k of n items cut into `parts` contiguous parts whose sizes differ by at most one."""
    return k * n // parts, (k + 1) * n // parts


def _slot_ranges(remaining, rank: int, world: int, worker: int, workers: int) -> list[list[int]]:
    """A worker's sub-range of its rank's range of the remaining positions."""
    a, b = _share(_count(remaining), world, rank)
    wa, wb = _share(b - a, workers, worker)
    return _slice(remaining, a + wa, a + wb)


def _rle_union(block_lists) -> list[list]:
    """Union of run-length encoded consumed sets ([epoch_from, epoch_to, ranges] blocks)."""
    blocks = [b for bl in block_lists for b in bl if b[2]]
    cuts = sorted({int(e) for b in blocks for e in b[:2]})
    out: list[list] = []
    for lo, hi in zip(cuts, cuts[1:]):
        ranges = _normalize([r for b in blocks if b[0] <= lo and hi <= b[1] for r in b[2]])
        if not ranges:
            continue
        if out and out[-1][1] == lo and out[-1][2] == ranges:
            out[-1][1] = hi
        else:
            out.append([lo, hi, ranges])
    return out


def _rle_at(blocks, epoch: int) -> list[list[int]]:
    return next((b[2] for b in blocks if b[0] <= epoch < b[1]), [])


def _first_open_epoch(blocks, n: int) -> int:
    epoch = 0
    for lo, hi, ranges in blocks:
        if lo > epoch or ranges != [[0, n]]:
            break
        epoch = hi
    return epoch


# ---- versions -> plans ----------------------------------------------------------------------------

@dataclass
class _Source:
    """What a worker needs of one source (picklable; no open handles)."""
    index: int
    label: str                  # URI@id, for messages
    version: str
    uri: str
    weight: float
    shards: list[dict]
    keys: list[np.ndarray]      # per shard, the training keys in tar order (bytes: one buffer,
                                # so forked workers do not copy them by touching refcounts)
    heldout: list[tuple[int, str]]
    axis_m: float               # drawn anchor axis length of the version
    fingerprint: str
    consumed: list              # RLE consumed set the loader started from

    @property
    def n(self) -> int:
        return sum(len(k) for k in self.keys)

    @property
    def salt(self) -> int:
        return _key_hash(self.version) & 0xFFFFFFFF


def _plan_source(i: int, src: DataSource, stage: str, cfg: LoaderConfig, storage_options: dict) -> tuple[_Source, dict]:
    uri, ref = split_ref(src.dataset)
    store = DatasetStore(uri, **storage_options)
    record = store.resolve(ref)
    label = f"{store.uri}@{record['id']}"
    if not src.weight > 0:
        raise DataError(f"{label}: mixing weight must be > 0, got {src.weight}")
    shards = store.version_shards(record)
    with ThreadPoolExecutor(8) as pool:       # one small parquet per shard: hide object-store latency
        indexes = list(pool.map(store.shard_index, shards))
    kind, kinds = STAGE_KIND[stage], Counter()
    usable = []                                   # per shard: this stage's keys in tar order
    for index in indexes:
        mine = []
        for key, k in zip(index.column("key").to_pylist(), index.column("kind").to_pylist()):
            kinds[k] += 1
            if k == kind:
                mine.append(key)
        usable.append(mine)
    held = holdout_set([key for mine in usable for key in mine], cfg.holdout_fraction)
    keys = [np.array([k.encode() for k in mine if k not in held], dtype=np.bytes_) for mine in usable]
    heldout = [(j, key) for j, mine in enumerate(usable) for key in mine if key in held]
    if not kinds[kind]:
        raise DataError(f"{label}: no samples usable by stage '{stage}' (it needs '{kind}' samples; "
                        f"the version holds {dict(kinds) or 'none'})")
    if not any(len(k) for k in keys):
        raise DataError(f"{label}: all {kinds[kind]} '{kind}' samples are held out "
                        f"(holdout_fraction={cfg.holdout_fraction}): nothing left to train stage '{stage}'")
    fingerprint = hashlib.sha1(json.dumps([kind, cfg.seed, cfg.holdout_fraction, len(shards),
                                           sum(map(len, keys))]).encode()).hexdigest()[:16]
    axis_m = float((record.get("config") or {}).get("anchor_axis_m", 0.2))
    plan = _Source(i, label, record["id"], store.uri, float(src.weight), shards, keys, heldout, axis_m,
                   fingerprint, [])
    return plan, {**record, "uri": store.uri}


def _epoch_order(plan: _Source, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard order of an epoch and the first position of each shard in that order."""
    order = np.random.default_rng([seed, epoch, plan.salt]).permutation(len(plan.shards))
    sizes = np.array([len(plan.keys[j]) for j in order], np.int64)
    return order, np.cumsum(sizes) - sizes


def _shuffled(items, size: int, rng: np.random.Generator):
    """Shuffle buffer: emit a random buffered item for each new one, the rest shuffled at the end."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = int(rng.integers(len(buf)))
        out, buf[k] = buf[k], item
        yield out
    for k in rng.permutation(len(buf)):
        yield buf[k]


SMALL = 4096      # elements: smaller fields cross from a worker pickled inline, larger ones in shm


def _empty(shape, dtype) -> torch.Tensor:
    """A batch tensor; in a DataLoader worker directly in shared memory, so handing it to the main
    process does not copy it once more."""
    out = torch.empty(shape, dtype=dtype)
    return out.share_memory_() if get_worker_info() is not None else out


def collate(samples: list[dict]) -> dict:
    """Per-sample arrays -> a batch. Images travel as uint8 HWC up to here and become float32 CHW
    in [-1, 1] in one pass, written straight into the (shared) batch tensor. Small fields stay
    numpy arrays: pickled inline they cost the main process far less than one shm segment each
    (`_as_tensors` makes them tensors there)."""
    batch = {"keys": [s["key"] for s in samples]}
    for name in samples[0]:
        if name == "key":
            continue
        arrays = [np.asarray(s[name]) for s in samples]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"samples {batch['keys']} cannot share a batch: '{name}' shapes differ "
                            f"({sorted(shapes)}); mixed versions need the same Plücker grid")
        stacked = np.stack(arrays)
        if name in IMAGE_FIELDS:
            chw = torch.from_numpy(stacked).movedim(-1, -3)
            batch[name] = _empty(chw.shape, torch.float32).copy_(chw).div_(127.5).sub_(1.0)
        elif stacked.size > SMALL:
            batch[name] = _empty(stacked.shape, torch.from_numpy(stacked).dtype).copy_(torch.from_numpy(stacked))
        else:
            batch[name] = stacked
    return batch


def _as_tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _as_is(batch):
    """The DataLoader's collate_fn: batches are made in the worker (`collate`)."""
    return batch


# ---- the worker-side stream -----------------------------------------------------------------------

class _Stream(IterableDataset):
    """Runs in each DataLoader worker: its slice of every source, mixed, decoded, batched."""

    def __init__(self, sources: list[_Source], stage: str, cfg: LoaderConfig, rank: int, world: int,
                 storage_options: dict):
        self.sources, self.stage, self.cfg = sources, stage, cfg
        self.rank, self.world, self.storage_options = rank, world, storage_options
        self._stores: dict[str, DatasetStore] = {}
        self._reader = ShardReader(stage, cfg.range_reads)

    def _store(self, uri: str) -> DatasetStore:
        # created in the worker: no filesystem handle crosses the fork
        if uri not in self._stores:
            self._stores[uri] = DatasetStore(uri, **self.storage_options)
        return self._stores[uri]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            cv2.setNumThreads(1)            # one core per worker: no thread pool oversubscription
        streams = {s.index: self._source_samples(s, worker, workers) for s in self.sources}
        rng = np.random.default_rng([self.cfg.seed, self.rank, worker, 0x4D4958])
        batch = []
        while streams:
            ids = list(streams)
            weights = np.array([self.sources[i].weight for i in ids])
            i = ids[int(rng.choice(len(ids), p=weights / weights.sum()))] if len(ids) > 1 else ids[0]
            try:
                batch.append(next(streams[i]))
            except StopIteration:           # this worker has no share of that source any more
                del streams[i]
                continue
            if len(batch) == self.cfg.batch_size:
                yield collate(batch)
                batch = []
        if batch:   # a worker of a tiny version whose share ran out: deliver, never lose samples
            yield collate(batch)

    def _source_samples(self, src: _Source, worker: int, workers: int) -> Iterator[dict]:
        """Decoded samples of `src` for this worker, epoch after epoch; ends only when the worker's
        share of a full epoch is empty (more workers than samples) after the resumed epochs."""
        epoch = _first_open_epoch(src.consumed, src.n)
        state_end = max((b[1] for b in src.consumed), default=0)
        has_share = bool(_slot_ranges([[0, src.n]], self.rank, self.world, worker, workers))
        while epoch < state_end or has_share:
            remaining = _complement(_rle_at(src.consumed, epoch), src.n)
            mine = _slot_ranges(remaining, self.rank, self.world, worker, workers)
            rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, worker, src.salt])
            for position, raw in _shuffled(self._read(src, epoch, mine), self.cfg.shuffle_buffer, rng):
                sample_rng = np.random.default_rng([self.cfg.seed, epoch, _key_hash(raw["__key__"])])
                out = decode_sample(raw, self.stage, self.cfg, src.axis_m, sample_rng, self.cfg.augment)
                out.update(_source=src.index, _epoch=epoch, _position=position)
                yield out
            epoch += 1

    def _read(self, src: _Source, epoch: int, mine) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) of the positions in `mine`, shard by shard in the epoch's order."""
        order, starts = _epoch_order(src, self.cfg.seed, epoch)
        for j, start in zip(order, starts):
            keys = src.keys[j]
            wanted = {keys[p - start].decode(): p
                      for a, b in mine for p in range(max(a, start), min(b, start + len(keys)))}
            if wanted:
                for raw in self._reader.samples(self._store(src.uri), src.shards[j], wanted):
                    yield wanted[raw["__key__"]], raw


# ---- the loader -----------------------------------------------------------------------------------

class TrainingLoader:
    """Batches of one rank from weighted dataset versions (module docstring: contract, state)."""

    def __init__(self, sources: list[DataSource], stage: str, cfg: LoaderConfig, *, rank: int = 0,
                 world_size: int = 1, state: dict | None = None, storage_options: dict | None = None):
        if stage not in STAGE_KIND:
            raise DataError(f"unknown stage {stage!r} (pretrain, mid or post)")
        if not sources:
            raise DataError("the loader needs at least one dataset source")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not within world_size {world_size}")
        self.stage, self.cfg, self.rank, self.world_size = stage, cfg, rank, world_size
        self._storage_options = dict(storage_options or {})
        planned = [_plan_source(i, s, stage, cfg, self._storage_options) for i, s in enumerate(sources)]
        self._sources = [p for p, _ in planned]
        self.versions = [r for _, r in planned]
        ids = [s.version for s in self._sources]
        if len(set(ids)) < len(ids):
            raise DataError(f"a version is listed twice among the sources ({ids})")
        for s in self._sources:
            if s.n < world_size:
                raise DataError(f"{s.label}: {s.n} training samples for stage '{stage}' < world_size "
                                f"{world_size}: some ranks would get no data")
        self._apply_state(state)
        self.samples_per_epoch = sum(s.n for s in self._sources)
        self._seen: dict[tuple[int, int], list] = {}
        self._folded: dict[int, list] = {}

    def _apply_state(self, state: dict | None) -> None:
        if not state:
            return
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
        saved = dict(state.get("sources", {}))
        for s in self._sources:
            entry = saved.pop(s.version, None)
            if entry is None:
                continue
            if (entry["n"], entry["fingerprint"]) != (s.n, s.fingerprint):
                raise DataError(f"{s.label}: the loader state was saved with another stage kind, seed or "
                                "holdout_fraction; it cannot resume sample-exactly")
            s.consumed = _rle_union([entry["consumed"]])
        if saved:
            log.warning("loader state of versions not among the sources ignored: %s", sorted(saved))

    def __iter__(self) -> Iterator[dict]:
        self._seen, self._folded = {}, {}
        stream = _Stream(self._sources, self.stage, self.cfg, self.rank, self.world_size, self._storage_options)
        workers = self.cfg.num_workers
        # Workers start from a fresh forkserver, never fork()ed from this process: under Ray
        # (Train workers, tests with a local Ray) the process runs gRPC and other threads, and a
        # fork taken while one of them holds a lock deadlocks the child (seen: futex wait forever).
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            multiprocessing_context="forkserver" if workers else None,
                            persistent_workers=False)
        for batch in loader:
            batch = _as_tensors(batch)
            self._record(batch)
            yield batch
        raise RuntimeError("the training stream ended (a bug: it is infinite)")

    def _record(self, batch: dict) -> None:
        """Mark a batch consumed, before it is handed out (the state is what was yielded)."""
        for s, e, p in zip(batch["_source"].tolist(), batch["_epoch"].tolist(), batch["_position"].tolist()):
            seen = self._seen.setdefault((s, e), [])
            seen.append([p, p + 1])
            if len(seen) > 4096:
                self._seen[(s, e)] = _normalize(seen)
        if len(self._seen) > 64:        # bound memory over many epochs: fold into the RLE form
            self._fold()

    def _fold(self) -> None:
        for s in self._sources:
            blocks = [[e, e + 1, _normalize(r)] for (i, e), r in self._seen.items() if i == s.index]
            self._folded[s.index] = _rle_union([self._folded.get(s.index, []), blocks])
        self._seen = {}

    def state_dict(self) -> dict:
        """JSON-able: what this rank's iterator has yielded, plus the state it started from."""
        self._fold()
        return {"format": STATE_FORMAT, "sources": {
            s.version: {"n": s.n, "fingerprint": s.fingerprint,
                        "consumed": _rle_union([s.consumed, self._folded.get(s.index, [])])}
            for s in self._sources}}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Union of the ranks' states: the `state` of a loader of any world size / workers."""
        merged: dict[str, dict] = {}
        for state in states:
            if state.get("format") != STATE_FORMAT:
                raise DataError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
            for vid, entry in state["sources"].items():
                m = merged.setdefault(vid, {"n": entry["n"], "fingerprint": entry["fingerprint"], "parts": []})
                if (m["n"], m["fingerprint"]) != (entry["n"], entry["fingerprint"]):
                    raise DataError(f"version {vid}: loader states of different configurations cannot be merged")
                m["parts"].append(entry["consumed"])
        return {"format": STATE_FORMAT, "sources": {
            vid: {"n": m["n"], "fingerprint": m["fingerprint"], "consumed": _rle_union(m["parts"])}
            for vid, m in merged.items()}}

    def anchor_axis_m(self, source: int) -> float:
        """The drawn anchor axis length of source `source`'s version (to redraw its anchors)."""
        return self._sources[source].axis_m

    def heldout_batch(self, n: int, frames: str = "heldout", targets: str = "heldout") -> dict:
        """The first n held-out samples (by source, then split name), no augmentation; views drawn
        with a generator seeded by (seed, key) so every call returns the same batch. frames=
        "seen": the first n TRAINING samples instead (novel cameras of frames the model saw). With
        cfg.holdout_cameras > 0 the targets are the sample's held-out cameras either way; targets=
        "orbit": every camera instead, by azimuth (a turnaround next to its ground truth)."""
        if frames not in ("heldout", "seen") or targets not in ("heldout", "orbit"):
            raise ValueError(f"frames must be 'heldout' or 'seen' and targets 'heldout' or 'orbit', "
                             f"got {frames!r}, {targets!r}")
        if frames == "heldout":
            items = [(s, j, key) for s in self._sources for j, key in s.heldout]
        else:
            items = [(s, j, key.decode()) for s in self._sources for j, keys in enumerate(s.keys) for key in keys]
        # by source, then split name: the same samples wherever the shards put them
        items = sorted(items, key=lambda item: (item[0].index, split_name(item[2]), item[2]))[:n]
        if not items:
            raise DataError(f"no {'held-out' if frames == 'heldout' else 'training'} samples for stage "
                            f"'{self.stage}' (holdout_fraction={self.cfg.holdout_fraction})")
        raws: dict[tuple[int, str], dict] = {}
        reader = ShardReader(self.stage, self.cfg.range_reads)
        for i, j in dict.fromkeys((src.index, j) for src, j, _ in items):
            src = self._sources[i]
            wanted = {key for t, jj, key in items if t.index == i and jj == j}
            store = DatasetStore(src.uri, **self._storage_options)
            raws.update({(i, raw["__key__"]): raw for raw in reader.samples(store, src.shards[j], wanted)})
        samples = []
        for position, (src, _, key) in enumerate(items):
            rng = np.random.default_rng([self.cfg.seed, HELDOUT_SALT, _key_hash(key)])
            out = decode_sample(raws[(src.index, key)], self.stage, self.cfg, src.axis_m, rng, augment=False,
                                split=targets)
            out.update(_source=src.index, _epoch=-1, _position=position)
            samples.append(out)
        return _as_tensors(collate(samples))
