"""Reading the samples of a shard a worker wants, holding the members its stage needs.

Two paths. Streaming (`stream_shard`): stock webdataset over the whole tar up to the last wanted
sample; every member header is parsed, skipped members are not kept. By offsets (`read_ranged`),
when the shard index has its `members` column (builds since it was added): the shard index records, per sample, where each member's data lies in the tar (dataprep.store.shards.
MEMBER_TYPE). A worker plans the wanted members of the wanted samples in tar order, reads each
member together with the ustar header block before it (512 bytes: the header checks that the
index still describes this tar), merges ranges closer than MERGE_GAP into one read (skipping a
mask costs less than another request or syscall) and reads at most CHUNK_BYTES at a time, so
memory stays bounded on ~1 GB shards. No tar header is parsed for skipped members, which is what
streaming with Python's tarfile spends most of its time on (benches/RESULTS.md, "Loader").

Every range is bounded by the tar's size from the version's shard list before anything is read:
an index pointing past the end, or a tar shorter than its index says, is one DataError line,
never a huge read or a hang.
"""
from __future__ import annotations

import bisect
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

from webdataset.tariterators import group_by_keys, tar_file_expander

from pippo_common.errors import DataError
from dataprep.store.core import DatasetStore

TAR_BLOCK = 512
MERGE_GAP = 64 << 10        # bytes: ranges closer than this are read as one
CHUNK_BYTES = 16 << 20      # bytes read per round of requests (bounds a worker's memory)
CACHED_INDEXES = 8          # member indexes a reader keeps (a worker revisits its shards each epoch)


def stage_member(stage: str, name: str) -> bool:
    """Whether a member (`{key}.{suffix}`) is needed by the stage: masks never, and mid needs no
    anchors, face crops or Plücker maps. The others are skipped unread."""
    suffix = name.split(".", 1)[-1]
    if suffix.endswith("mask.png"):
        return False
    return stage != "mid" or not (suffix.startswith(("face", "plucker", "anchor")) or ".anchor." in suffix)


@dataclass(frozen=True)
class Member:
    key: str
    ext: str
    offset: int     # of the data; the member's ustar header is the block before
    size: int

    @property
    def start(self) -> int:
        return self.offset - TAR_BLOCK

    @property
    def end(self) -> int:
        return self.offset + self.size


def index_members(table) -> dict[str, list[Member]]:
    """key -> members in tar order, from a shard index's (key, members) columns."""
    return {key: [Member(key, m["ext"], int(m["offset"]), int(m["size"])) for m in members or []]
            for key, members in zip(table.column("key").to_pylist(), table.column("members").to_pylist())}


def _merged(members: list[Member]) -> list[tuple[int, int]]:
    ranges: list[list[int]] = []
    for m in sorted(members, key=lambda m: m.start):
        if ranges and m.start - ranges[-1][1] <= MERGE_GAP:
            ranges[-1][1] = max(ranges[-1][1], m.end)
        else:
            ranges.append([m.start, m.end])
    return [(a, b) for a, b in ranges]


def _check_header(shard_url: str, m: Member, header: bytes) -> None:
    """The ustar header before a member's data names that member and its size: the index and the
    tar agree (a rewritten tar or a stale index fails here, not as garbage in a decoder)."""
    name = f"{m.key}.{m.ext}".encode()[:100]        # longer names: truncated here, full in a PAX header
    try:
        size = tarfile.nti(header[124:136])
    except tarfile.InvalidHeaderError:
        size = -1
    if header[:100].split(b"\0", 1)[0] != name or size != m.size:
        raise DataError(f"{shard_url}: the shard index does not match the tar at byte {m.start} "
                        f"(member {m.key}.{m.ext}); the tar or its index was changed")


def _read_chunk(store: DatasetStore, shard: dict, chunk: list[tuple[str, list[Member]]]) -> Iterator[dict]:
    ranges = _merged([m for _, members in chunk for m in members])
    try:
        blobs = store.shard_ranges(shard, ranges)
    except OSError as exc:
        raise DataError(f"{shard['url']}: reading {len(ranges)} byte ranges failed "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    for (a, b), blob in zip(ranges, blobs):
        if isinstance(blob, BaseException):         # fsspec cat_ranges returns per-range errors
            raise DataError(f"{shard['url']}: reading bytes {a}-{b} failed ({type(blob).__name__}: "
                            f"{' '.join(str(blob).split())[:200]})")
        if len(blob) != b - a:
            raise DataError(f"{shard['url']}: the tar ends before byte {b} that its index names "
                            f"(got {len(blob)} of {b - a} bytes at {a}); the shard is truncated")
    starts = [a for a, _ in ranges]
    for key, members in chunk:
        sample = {"__key__": key, "__url__": shard["url"]}
        for m in members:
            k = bisect.bisect_right(starts, m.start) - 1
            blob, base = blobs[k], starts[k]
            _check_header(shard["url"], m, blob[m.start - base:m.offset - base])
            # lower-case suffixes, as webdataset's group_by_keys delivers them
            sample[m.ext.lower()] = blob[m.offset - base:m.end - base]
        yield sample


def read_ranged(store: DatasetStore, shard: dict, members: dict[str, list[Member]], wanted,
                select: Callable[[str], bool]) -> Iterator[dict]:
    """The wanted samples of a shard in tar order, as webdataset would group them ({"__key__",
    "__url__", ext: bytes}), holding only the members `select(f"{key}.{ext}")` accepts."""
    missing = set(wanted) - members.keys()
    if missing:
        raise DataError(f"{shard['url']}: {len(missing)} samples are not in its index (e.g. {min(missing)})")
    limit = shard.get("bytes") or 0
    chunk: list[tuple[str, list[Member]]] = []
    span = 0
    for key, ms in members.items():
        if key not in wanted:
            continue
        mine = [m for m in ms if select(f"{m.key}.{m.ext}")]
        for m in mine:
            if m.offset < TAR_BLOCK or m.size < 0 or (limit and m.end > limit):
                raise DataError(f"{shard['url']}: its index places member {m.key}.{m.ext} at bytes "
                                f"{m.offset}-{m.end}, outside the {limit}-byte tar")
        chunk.append((key, mine))
        span += sum(m.size + TAR_BLOCK for m in mine)
        if span >= CHUNK_BYTES:
            yield from _read_chunk(store, shard, chunk)
            chunk, span = [], 0
    if chunk:
        yield from _read_chunk(store, shard, chunk)


def stream_shard(store: DatasetStore, shard: dict, wanted, select: Callable[[str], bool]) -> Iterator[dict]:
    """The wanted samples of a shard, in tar order, read with stock webdataset; other samples'
    members are skipped unread, and reading stops after the last wanted sample."""
    left = set(wanted)
    with store.open_shard(shard) as stream:
        files = tar_file_expander([{"url": shard["url"], "stream": stream}],
                                  select_files=lambda name: name.split(".", 1)[0] in left and select(name))
        for sample in group_by_keys(files):
            if sample["__key__"] in left:
                left.discard(sample["__key__"])
                yield sample
                if not left:
                    return
    if left:
        raise DataError(f"{shard['url']}: {len(left)} samples of its index are not in the tar (e.g. {min(left)})")


class ShardReader:
    """A stage's reads of shards: by offsets where the shard's index has them and `range_reads`,
    streaming otherwise (indexes of older builds, e.g. a parent's shards a child version keeps).
    Picklable before first use; each DataLoader worker then keeps its own small index cache."""

    def __init__(self, stage: str, range_reads: bool = True):
        self.stage, self.range_reads = stage, range_reads
        self._indexes: OrderedDict[str, dict | None] = OrderedDict()

    def select(self, name: str) -> bool:
        return stage_member(self.stage, name)

    def _members(self, store: DatasetStore, shard: dict) -> dict[str, list[Member]] | None:
        url = shard["index_url"]
        if url in self._indexes:
            self._indexes.move_to_end(url)
            return self._indexes[url]
        table = store.shard_members(shard)
        members = None if table is None else index_members(table)
        self._indexes[url] = members
        if len(self._indexes) > CACHED_INDEXES:
            self._indexes.popitem(last=False)
        return members

    def samples(self, store: DatasetStore, shard: dict, wanted) -> Iterator[dict]:
        """The wanted samples (keys) of a shard in tar order: {"__key__", "__url__", ext: bytes}."""
        members = self._members(store, shard) if self.range_reads else None
        if members is None:
            return stream_shard(store, shard, wanted, self.select)
        return read_ranged(store, shard, members, wanted, self.select)
