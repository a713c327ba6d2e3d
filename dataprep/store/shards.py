"""Bounded, atomically committed WebDataset shards with a parquet index per shard.

Each partition job writes its own shards named `{part}-{kind}{n:04d}.tar` (one sample kind per
shard, so readers with a fixed schema, e.g. Ray Data's `read_webdataset`, read them): deterministic,
so a re-run after a crash writes the same names and a finished part is simply reused. A shard is
written with webdataset's TarWriter (fixed mtime, so equal samples give equal bytes) to a local
temporary file, then committed: renamed into place on a local store, uploaded in one finalised
PUT/multipart upload on an object store. Readers never see a partial shard.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from dataprep.build_config import ShardLimits
from pippo_common.storage import absolute_url, fs_and_path, is_local, join

TAR_BLOCK = 512
# Per sample, where each member's data lies in the tar: `ext` is the member name after "{key}.",
# `offset` the byte offset of its data (its ustar header is the block before), `size` its length.
# Lets the loader read only the members a stage needs (dataprep/store/shard_reader.py). Indexes written
# before this column existed lack it; readers then stream the tar.
MEMBER_TYPE = pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                          ("status", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()),
                          ("members", pa.list_(MEMBER_TYPE))])


@dataclass
class ShardInfo:
    url: str
    samples: int
    bytes: int
    sha256: str
    index_url: str
    kind: str = ""


def _tar_size(key: str, members: dict[str, bytes]) -> int:
    """Bytes a sample occupies in a tar: per member a header block (plus a PAX header and its
    data block when the name exceeds ustar's 100 characters) and the data rounded up to blocks."""
    total = 0
    for ext, data in members.items():
        long_name = len(key) + 1 + len(ext) > 100
        total += TAR_BLOCK * (3 if long_name else 1) + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
    return total


def member_offsets(tar_path: str) -> dict[str, list[dict]]:
    """key -> [{ext, offset, size}] of a finished local tar, read back with tarfile: exact whatever
    headers (PAX for long names) tarfile chose, where computing them would have to mirror it."""
    out: dict[str, list[dict]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            out.setdefault(key, []).append({"ext": ext, "offset": info.offset_data, "size": info.size})
    return out


def temp_file_for(url: str, suffix: str) -> str:
    """A temporary file for what becomes `url`: beside it on a local store (so the commit is a
    same-filesystem rename, and gc finds it after a crash), in $TMPDIR for an object store."""
    fs, path = fs_and_path(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    else:
        fd, tmp = tempfile.mkstemp(prefix="pippo-", suffix=suffix)
    os.close(fd)
    return tmp


def commit_file(local_tmp: str, url: str) -> None:
    """Move a finished local file to `url`: fsync + rename on local storage, one upload otherwise."""
    fs, path = fs_and_path(url)
    if is_local(fs):
        with open(local_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(local_tmp, path)
    else:
        fs.put_file(local_tmp, path)
        os.unlink(local_tmp)


class ShardWriter:
    """Writes samples into shards `{shards_url}/{prefix}{n:04d}.tar` of at most `limits`."""

    def __init__(self, shards_url: str, prefix: str, limits: ShardLimits, kind: str = ""):
        self.shards_url, self.unit, self.limits, self.kind = shards_url, prefix, limits, kind
        self.shards: list[ShardInfo] = []
        self._part = 0
        self._open()

    def _name(self) -> str:
        return f"{self.unit}{self._part:04d}"

    def _open(self):
        self._tmp = temp_file_for(join(self.shards_url, f"{self._name()}.tar"), ".tar")
        self._file = open(self._tmp, "wb")
        # mtime must be an int: a float makes tarfile add a 1 KiB PAX header to every member
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="pippo", group="pippo")
        self._rows: list[dict] = []
        self._bytes = 2 * TAR_BLOCK  # end-of-archive blocks; counted, as the tar stream buffers

    def add(self, key: str, members: dict[str, bytes], source: str, kind: str, sha256: str = "") -> None:
        size = _tar_size(key, members)
        # tarfile pads the file to a 10 KiB record on close: a shard may pass max_bytes by < 10 KiB
        full = self._rows and (len(self._rows) >= self.limits.max_samples
                               or self._bytes + size > self.limits.max_bytes)
        if full:
            self._finish()
            self._part += 1
            self._open()
        self._tar.write({"__key__": key, **members})
        self._rows.append({"key": key, "source": source, "kind": kind, "status": "kept",
                           "bytes": size, "sha256": sha256})
        self._bytes += size

    def _finish(self):
        self._tar.close()
        self._file.close()
        if not self._rows:
            os.unlink(self._tmp)
            return
        digest = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        nbytes = os.path.getsize(self._tmp)
        offsets = member_offsets(self._tmp)
        for row in self._rows:
            row["members"] = offsets[row["key"]]
        url = join(self.shards_url, f"{self._name()}.tar")
        index_url = join(self.shards_url, f"{self._name()}.index.parquet")
        index_tmp = temp_file_for(index_url, ".parquet")
        pq.write_table(pa.Table.from_pylist(self._rows, schema=INDEX_SCHEMA), index_tmp)
        # The index lands before its shard; the unit marker (written by the caller after every
        # shard) is what makes either count, so a crash in between leaves nothing referenced.
        commit_file(index_tmp, index_url)
        commit_file(self._tmp, url)
        self.shards.append(ShardInfo(absolute_url(url), len(self._rows), nbytes, digest.hexdigest(),
                                     absolute_url(index_url), self.kind))

    def close(self) -> list[dict]:
        self._finish()
        return [asdict(s) for s in self.shards]

    def abort(self):
        self._tar.close()
        self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
