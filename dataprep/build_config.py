"""The typed config of `pippo data build` (SPEC §2 keys: dataset, sources, resolution, plucker_stride)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class Source:
    """One input source. kind: captures (a capture dir or a dir/prefix of captures), images (a
    dir/prefix of photos, searched recursively), urls (a .txt/.csv/.parquet list of URLs or
    paths), webdataset (a .tar, or a dir/prefix of tars)."""
    kind: Literal["captures", "images", "urls", "webdataset"]
    uri: str


@dataclass
class ShardLimits:
    max_samples: int = 2000
    max_bytes: int = 1_000_000_000      # ~1 GB per shard by default

    def __post_init__(self):
        if self.max_samples < 1 or self.max_bytes < 1024:
            raise ValueError("shard.max_samples must be >= 1 and shard.max_bytes >= 1024")


@dataclass
class PhotoFilters:
    min_side: int = 128                 # shorter side of the decoded photo, pixels
    max_aspect: float = 3.0             # longer side / shorter side
    max_pixels: int = 64_000_000        # larger claims are decompression bombs: refused unread
    detect_person: bool = False         # OpenCV's bundled HOG people detector
    detect_face: bool = False           # OpenCV's bundled Haar frontal-face cascade


@dataclass
class HttpConfig:
    timeout_s: float = 20.0
    retries: int = 3                    # extra attempts on connection errors and 429/5xx
    backoff_s: float = 0.2


@dataclass
class BuildConfig:
    dataset: str                        # target dataset URI (local path or fsspec URL)
    sources: list[Source]
    resolution: int = 256               # output side in pixels (square crops)
    # Plücker grid = resolution / stride (SPEC §4 factor f). Rays are smooth (affine before
    # normalisation), so a coarse grid upsampled bilinearly stays within 5e-4 rad of the exact
    # per-pixel rays (benches/plucker_storage.py); 32 at 256 px, 64 at 1024 px keep the stored
    # Plücker + anchor bytes under a quarter of the image bytes.
    plucker_stride: int = 32
    cameras: list[str] | None = None    # camera subset of studio samples (None = all)
    min_views: int = 2                  # studio frames with fewer valid views are rejected
    face_crop: bool = False             # add a face-crop view per camera (a second scale, as PSHuman)
    face_resolution: int = 128
    masks: bool = True                  # copy segmentation masks when the capture has them
    lossless: bool = False              # PNG instead of JPEG views
    jpeg_quality: int = 92
    anchor_axis_m: float = 0.2          # length of the drawn head axes, metres
    filters: PhotoFilters = field(default_factory=PhotoFilters)
    http: HttpConfig = field(default_factory=HttpConfig)
    shard: ShardLimits = field(default_factory=ShardLimits)
    # Inputs are hash-partitioned; each partition is one Ray task writing its own parts. A
    # property of the lineage: a child build keeps its parent's count (so it reads only its
    # partition's parent parts). Aim for ~1-10 GB of samples per partition: 10^9 photos of
    # ~100 KB suggest 16384.
    partitions: int = 16
    workers: int | None = None          # Ray tasks in flight (None = one per CPU)
    # the version to build on: "latest" = the newest version built with the same recipe (the same
    # sample settings); an id or tag picks another line; null builds from scratch
    parent: str | None = "latest"
    on_missing: Literal["remove", "keep"] = "remove"   # inputs gone from a re-read source
    max_attempts: int = 3               # tries of an input whose download (or a bug) failed
    dedup: bool = True                  # drop exact duplicates (sha256 of source bytes) in the build
    dedup_against_parent: bool = True   # ... and against every sample of the parent version
    tags: list[str] = field(default_factory=list)
    preview_samples: int = 8

    def __post_init__(self):
        if not self.sources:
            raise ValueError("'sources' must list at least one source")
        if self.resolution < 16 or self.resolution % self.plucker_stride:
            raise ValueError(f"resolution ({self.resolution}) must be >= 16 and divisible by "
                             f"plucker_stride ({self.plucker_stride})")
        if self.plucker_stride < 1:
            raise ValueError("plucker_stride must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be within 1..100")
        if self.partitions < 1 or self.min_views < 1 or self.max_attempts < 1:
            raise ValueError("partitions, min_views and max_attempts must be >= 1")

    def sample_settings(self) -> dict:
        """The settings that change how an input becomes a sample: a parent's outputs are reused
        only when these are equal (otherwise incremental reuse would mix two recipes)."""
        d = asdict(self)
        for key in ("dataset", "sources", "shard", "partitions", "workers", "parent", "dedup",
                    "dedup_against_parent", "tags", "preview_samples", "http", "on_missing", "max_attempts"):
            d.pop(key)
        return d

    def recipe_hash(self) -> str:
        blob = json.dumps(self.sample_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
