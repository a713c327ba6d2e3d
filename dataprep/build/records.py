"""The build's hand-offs as typed records: what the driver, the partition tasks and the commit
pass each other (dataprep/build/job.py has the whole job).

    PartitionTask    what a process task is asked (which partition, against which parent parts)
    PartitionPlan    what process decided for a partition, handed to write (or made by
                     maintenance for a takedown); travels through Ray's object store (pickled),
                     never stored
    PartitionResult  what write returns: the part record and whether it was reused
    ProcessRefs, DedupRefs   a stage's Ray object refs by name (a task has one return per
                     partition / sha bucket, so the shuffle never passes through the driver)
    CommitSettings   what a commit needs of the config (a build's, or a maintenance operation's)
    VersionPlan      what a version is made of: parent, parts, new results
    CommitTotals     the version's totals, from its base's plus each new part's deltas
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

COUNT_KEYS = ("inputs", "kept", "rejected", "removed")


class ConservationError(RuntimeError):
    """inputs != kept + rejected + removed, or kept != samples in shards: a bug, never committed."""


@dataclass
class PartitionTask:
    partition: int
    partitions: int
    buckets: int                     # sha buckets of the dedup shuffle
    store_uri: str
    recipe: str
    parent_parts: list[dict]         # the parent's ledger parts of this partition
    relisted: list[str]              # list files read again by this build
    dry_run: bool = False


@dataclass
class PartitionPlan:
    partition: int
    part: str | None = None              # the part id (None: nothing to do)
    finished: dict | None = None         # the part record when a re-run finds the part written
    decided: list[dict] = field(default_factory=list)   # ledger rows decided without a sample
    samples: list[dict] = field(default_factory=list)   # processed samples: row, key, members, kind
    gone: list[dict] = field(default_factory=list)      # ledger rows of inputs to remove
    gone_reason: tuple[str, str] = ("source", "gone from its source")   # (stage, reason) of `gone`
    replaced: list[dict] = field(default_factory=list)  # kept rows whose input changed in place
    previous: dict[str, dict] = field(default_factory=dict)   # parent rows of the inputs touched
    rewrites: dict[str, dict] = field(default_factory=dict)   # parent shard URL -> rewrite job
    seconds: float = 0.0
    todo: int = 0                        # inputs to read
    unknown_cameras: list[str] = field(default_factory=list)


@dataclass
class PartitionResult:
    record: dict                 # the part record (parts/{recipe}/{part}.json)
    reused: bool                 # written by an earlier run (or listed as it was)
    seconds: float = 0.0


@dataclass
class ProcessRefs:
    """The returns of one process task: a summary (the driver fetches only that), the plan
    (write fetches it) and one claims table per sha bucket (dedup b fetches claims[b])."""
    summary: object
    plan: object
    claims: list

    @classmethod
    def of(cls, refs) -> "ProcessRefs":
        return cls(refs[0], refs[1], list(refs[2:]))


@dataclass
class DedupRefs:
    """The returns of one dedup task: its sha part record and the losers of each partition."""
    record: object
    losers: list

    @classmethod
    def of(cls, refs) -> "DedupRefs":
        return cls(refs[0], list(refs[1:]))


@dataclass
class CommitSettings:
    recipe: str
    tags: list[str] = field(default_factory=list)
    preview_samples: int = 8
    config: dict = field(default_factory=dict)   # the config as written (redacted in the record)


@dataclass
class VersionPlan:
    parent: dict | None
    parent_parts: list[dict]         # parts the version lists again
    results: list[PartitionResult]   # the new (or reused) ledger parts
    sha_records: list[dict]          # the new sha index parts
    listings: dict                   # list file -> signature
    partitions: int
    started: float
    sha_buckets: int | None = None
    listed: int = 0                  # inputs listed by this build
    base: dict | None = None         # the totals the new parts add to
    base_is_parent: bool = True      # (False: the new parts are snapshots, summed from zero)

    @property
    def totals_base(self) -> dict | None:
        return self.parent if self.base_is_parent else self.base


@dataclass
class CommitTotals:
    counts: Counter
    reasons: Counter
    kinds: Counter
    samples: int
    bytes: int
    dropped_views: int
    new_shards: list[dict]

    @classmethod
    def of(cls, base: dict | None, results: list[PartitionResult]) -> "CommitTotals":
        """The base version's totals plus each new part's deltas: O(parts), never O(inputs)."""
        base = base or {}
        stats = base.get("stats", {})
        out = cls(counts=Counter({k: base.get("counts", {}).get(k, 0) for k in COUNT_KEYS}),
                  reasons=Counter(stats.get("rejected_by_reason", {})),
                  kinds=Counter(stats.get("samples_by_kind", {})),
                  samples=base.get("samples", 0), bytes=stats.get("bytes", 0),
                  dropped_views=stats.get("dropped_views", 0), new_shards=[])
        for r in (x.record for x in results):
            for key, n in r["counts"].items():
                if key.startswith("reason|"):
                    out.reasons[key[len("reason|"):]] += n
                elif key.startswith("kind|"):
                    out.kinds[key[len("kind|"):]] += n
                elif key in COUNT_KEYS:
                    out.counts[key] += n
            out.dropped_views += r["counts"].get("dropped_views", 0)
            out.samples += sum(s["samples"] for s in r["shards"]) - r.get("dropped_samples", 0)
            out.bytes += sum(s["bytes"] for s in r["shards"]) - r.get("dropped_bytes", 0)
            out.new_shards += r["shards"]
        return out

    def check(self) -> None:
        c = self.counts
        if c["kept"] != self.samples or c["inputs"] != c["kept"] + c["rejected"] + c["removed"]:
            raise ConservationError(f"inputs {c['inputs']} != kept {c['kept']} + rejected {c['rejected']} "
                                    f"+ removed {c['removed']} (samples {self.samples})")
