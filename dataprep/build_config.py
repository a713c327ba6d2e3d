"""The typed config of `pippo data build` (SPEC §2 keys: dataset, sources, resolution, plucker_stride)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dataprep.names import check_text, validate_camera_id, validate_tag
from pippo_common.redact import check_not_secret

MAX_RESOLUTION = 16384      # output side; larger would allocate gigabytes per view


def _finite(value: float, name: str, low: float, high: float = math.inf) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number within [{low:g}, {high:g}], got {value!r}")


@dataclass
class Source:
    """One input source. kind: captures (a capture dir or a dir/prefix of captures), images (a
    dir/prefix of photos, searched recursively), urls (a .txt/.csv/.parquet list of URLs or
    paths), webdataset (a .tar, or a dir/prefix of tars)."""
    kind: Literal["captures", "images", "urls", "webdataset"]
    uri: str

    def __post_init__(self):
        check_text(self.uri, "source uri")    # "" would read the current directory


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
    detect_person: bool = False         # reject photos without a person (the `detector` stage)
    detect_face: bool = False           # reject photos without a face (the `detector` stage)

    def __post_init__(self):
        if self.min_side < 1 or self.max_pixels < 1:
            raise ValueError(f"min_side and max_pixels must be >= 1 "
                             f"(got {self.min_side}, {self.max_pixels})")
        _finite(self.max_aspect, "max_aspect", 1.0)


@dataclass
class DetectorConfig:
    """The detection stage (dataprep.samples.detection): Ray actors that load the model once and detect
    people (and faces) in batches. Weights are never downloaded from a hub."""
    # opencv: OpenCV's bundled HOG people detector + Haar face cascade (no weights at all);
    # torch: a torchvision-style detector (`model`) with safetensors `weights`
    backend: Literal["opencv", "torch"] = "opencv"
    # torch: `module:callable` returning an nn.Module with torchvision's detection contract
    # (list of CHW float images in [0, 1] -> [{"boxes", "scores", "labels"[, "keypoints"]}]),
    # e.g. torchvision.models.detection:keypointrcnn_resnet50_fpn
    model: str = "dataprep.samples.tiny_detector:tiny_person_detector"
    model_kwargs: dict[str, Any] = field(default_factory=dict)   # passed to the callable
    weights: str | None = None          # torch: local path or fsspec URI of a .safetensors state dict
    person_label: int = 1               # torch: the label id of "person" (COCO: 1)
    # a detection counts from this score on; None = the backend's own default (HOG: SVM margin
    # 0, OpenCV's default; Haar: 0; torch: 0.5)
    min_person_score: float | None = None
    min_face_score: float | None = None
    max_side: int = 640                 # photos are sent to the detector at most this large
    margin: float = 0.2                 # crop: person adds this fraction of the box on each side
    # not part of the recipe (throughput only):
    batch_size: int = 16                # photos per actor call
    actors: int | None = None           # None: one per GPU on a GPU cluster, else CPUs / 2

    def __post_init__(self):
        module, _, name = self.model.partition(":")
        if not (module and name and all(p.isidentifier() for p in module.split(".") + name.split("."))):
            raise ValueError(f"detector.model must be 'module:callable', got {self.model!r}")
        if self.weights is not None:
            check_text(self.weights, "detector.weights")
            check_not_secret(self.weights, "detector.weights")
        for name in ("min_person_score", "min_face_score"):
            if getattr(self, name) is not None:
                _finite(getattr(self, name), f"detector.{name}", -1e6, 1e6)
        _finite(self.margin, "detector.margin", 0.0, 10.0)
        if not 32 <= self.max_side <= 8192 or not 1 <= self.batch_size <= 4096:
            raise ValueError("detector.max_side must be within 32..8192 and detector.batch_size within 1..4096")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"detector.actors must be >= 1 (or null: automatic), got {self.actors}")


@dataclass
class HttpConfig:
    # Each attempt ends at timeout_s from connect to last byte (a deadline, not a per-read
    # timeout); a stall before the response headers is retried, a body still arriving at the
    # deadline is not (a trickling server would trickle again).
    timeout_s: float = 20.0
    retries: int = 3                    # extra attempts on connection errors and 429/5xx
    backoff_s: float = 0.2
    max_retry_wait_s: float = 10.0      # a server's Retry-After is honoured up to this
    max_redirects: int = 5              # followed one by one, each target checked again
    # Loopback, link-local (cloud metadata), private, multicast, reserved and unspecified
    # addresses are refused unless this is true (an internal mirror, a test server).
    allow_private_addresses: bool = False

    def __post_init__(self):
        _finite(self.timeout_s, "timeout_s", 0.001, 3600.0)
        _finite(self.backoff_s, "backoff_s", 0.0, 60.0)
        if not 0 <= self.retries <= 20:
            raise ValueError(f"retries must be within 0..20, got {self.retries}")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.max_retry_wait_s < 0 \
                or self.max_redirects < 0:
            raise ValueError("http: timeout_s must be > 0; retries, backoff_s, max_retry_wait_s and "
                             "max_redirects must be >= 0")


@dataclass
class InputPolicy:
    """What a build may read, and how much (config key `inputs`). Not part of the recipe: it
    decides which inputs are read, not how an input becomes a sample."""
    max_bytes: int = 256 * 2**20        # one cap for every input read: photo file, object, HTTP
                                        # body, tar member, capture zip member, list or JSON file
    max_tar_bytes: int = 2 * 2**30      # a whole WebDataset tar (held in memory by its task)
    max_zip_ratio: float = 100.0        # capture zip members inflating more than this are refused
    # URL lists: schemes entries may use besides local paths (the list's own object-store
    # scheme is always allowed); chained URLs (`a::b`) never are.
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    # Local directories that list entries and symlinks may point into, besides the source's own
    # directory (a URL list's directory, a photo or capture source root).
    local_roots: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_tar_bytes < 1 or self.max_zip_ratio < 1:
            raise ValueError("inputs.max_bytes and inputs.max_tar_bytes must be >= 1, inputs.max_zip_ratio >= 1")
        self.allowed_schemes = [str(s).lower().removesuffix("://") for s in self.allowed_schemes]
        bad = [s for s in self.allowed_schemes if s in ("file", "local") or not s.isidentifier()]
        if bad:
            raise ValueError(f"inputs.allowed_schemes: {bad[0]!r} is not an allowed remote scheme "
                             "(local paths are governed by inputs.local_roots)")


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
    # photos: "center" = the centre square; "person" = a square around the chosen (largest)
    # detected person plus detector.margin (photos without a person are rejected)
    crop: Literal["center", "person"] = "center"
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    inputs: InputPolicy = field(default_factory=InputPolicy)
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
        # Everything a build could trip over later is checked here, before anything is built.
        check_text(self.dataset, "'dataset' (the target dataset URI)")
        # Store paths and tag file names are listed by anyone who can read the store.
        check_not_secret(self.dataset, "'dataset'")
        if not self.sources:
            raise ValueError("'sources' must list at least one source")
        if self.plucker_stride < 1:
            raise ValueError(f"plucker_stride must be >= 1, got {self.plucker_stride}")
        if not 16 <= self.resolution <= MAX_RESOLUTION or self.resolution % self.plucker_stride:
            raise ValueError(f"resolution ({self.resolution}) must be within 16..{MAX_RESOLUTION} and "
                             f"divisible by plucker_stride ({self.plucker_stride})")
        if not 16 <= self.face_resolution <= MAX_RESOLUTION:
            raise ValueError(f"face_resolution must be within 16..{MAX_RESOLUTION}, got {self.face_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be within 1..100")
        if self.partitions < 1 or self.min_views < 1 or self.max_attempts < 1:
            raise ValueError("partitions, min_views and max_attempts must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 (or null: one per CPU), got {self.workers}")
        if self.preview_samples < 0:
            raise ValueError(f"preview_samples must be >= 0, got {self.preview_samples}")
        _finite(self.anchor_axis_m, "anchor_axis_m", 1e-6, 1e3)
        if self.cameras is not None:
            if not self.cameras:
                raise ValueError("cameras: [] selects no camera (leave it out, or null, for all)")
            for cam in self.cameras:
                validate_camera_id(cam)
        for i, tag in enumerate(self.tags):   # a bad tag must fail now, not after the version is committed
            check_not_secret(tag, f"tags[{i}]")     # checked after ${VAR} substitution, like the name
            validate_tag(tag)

    def sample_settings(self) -> dict:
        """The settings that change how an input becomes a sample: a parent's outputs are reused
        only when these are equal (otherwise incremental reuse would mix two recipes)."""
        d = asdict(self)
        for key in ("dataset", "sources", "shard", "partitions", "workers", "parent", "dedup",
                    "dedup_against_parent", "tags", "preview_samples", "http", "on_missing", "max_attempts",
                    "inputs"):
            d.pop(key)
        if not self.needs_detection():
            # builds without detection keep the recipe (and the incremental reuse) they had
            d.pop("crop"), d.pop("detector")
        else:
            d["detector"].pop("batch_size"), d["detector"].pop("actors")
        return d

    def needs_detection(self) -> bool:
        return self.filters.detect_person or self.filters.detect_face or self.crop == "person"

    def recipe_hash(self) -> str:
        blob = json.dumps(self.sample_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
