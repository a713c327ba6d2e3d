"""The loader's configuration types: plain dataclasses, importable without torch, cv2 or
webdataset (a training config names them; reading a config must not load the data stack)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataSource:
    dataset: str            # "URI@REF" (REF = id, prefix, tag, latest)
    weight: float = 1.0     # mixing weight among several sources


@dataclass
class LoaderConfig:         # loaded from YAML by pippo_common.config.load_config (plain types only)
    batch_size: int = 4          # per rank
    num_workers: int = 2         # DataLoader workers per rank (0 allowed)
    shuffle_buffer: int = 64     # per-worker shuffle buffer, samples
    seed: int = 0
    resolution: int = 128        # pixel side of delivered views/reference (square)
    views: int = 4               # target views per sample (mid/post); pretrain always 1
    face_views: int = 0          # post: how many of the views are face crops, when the sample has them
    augment: bool = True         # pretrain augmentation (crop, flip, colour)
    holdout_fraction: float = 0.0  # samples (by split name hash) excluded from training, served by heldout_batch
    holdout_cameras: float = 0.0   # mid/post: fraction of each studio sample's cameras (by camera id hash)
                                   # never used in training, the targets of heldout_batch
    prefetch_factor: int = 2
    range_reads: bool = True     # read only the members a stage needs, by the shard index's byte
                                 # offsets (indexes without them stream the tar); False: always stream

    def __post_init__(self):
        if self.batch_size < 1 or self.views < 1 or self.resolution < 8 or self.prefetch_factor < 1:
            raise ValueError("batch_size, views and prefetch_factor must be >= 1 and resolution >= 8")
        if self.num_workers < 0 or self.face_views < 0 or self.shuffle_buffer < 0:
            raise ValueError("num_workers, face_views and shuffle_buffer must be >= 0")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.holdout_cameras < 1.0:
            raise ValueError(f"holdout_cameras must lie in [0, 1), got {self.holdout_cameras}")
