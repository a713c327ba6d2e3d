"""Listing a build's sources as Ray tasks, each input routed to its partition.

The driver only plans listing units from one `info` per source, never listing a directory or
prefix itself: a photo directory is listed by `splits` tasks, split k taking the top files and
sub-trees whose URL hashes to k (a flat prefix of 10^9 photos costs the driver nothing per photo);
a URL list by byte ranges (.txt) or row groups (.parquet) of ~LIST_SPLIT_BYTES; a tree of tars or
captures by one task. Each task returns one Arrow table per partition (Ray's object store holds
them, not the driver). An input's partition is
a hash of the URL that holds its bytes (a photo, a capture, a tar), so a capture's frames and a
tar's members stay together and a partition job can open each once. The partition count is a
property of the dataset lineage (recorded in each version): a child build reuses its parent's, so
each partition job reads only the parent parts of its own partition.

A URL list (or tar) the parent consumed whole is not read again: the parent records the size and
ETag/mtime of every list file it listed, and an unchanged one is skipped (img2dataset's
input-shard granularity), its inputs taken as unchanged.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

from dataprep.build_config import InputPolicy, Source
from pippo_common.errors import DataError
from dataprep.inputs.sources import enumerate_source, list_directory_split, list_file_inputs, signature_tag
from pippo_common.redact import strip_credentials
from pippo_common.storage import fs_and_path, url_of

LISTING_SCHEMA = pa.schema([("input_id", pa.string()), ("kind", pa.string()), ("uri", pa.string()),
                            ("frame", pa.int64()), ("member", pa.string()), ("size", pa.int64()),
                            ("listing", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                            ("tag", pa.string()), ("list_pos", pa.int64())])
LIST_SPLIT_BYTES = 64 * 2**20     # a URL list is read in byte ranges of about this size, one task each


def partition_of(uri: str, partitions: int) -> int:
    return int.from_bytes(hashlib.sha1(uri.encode()).digest()[:8], "big") % partitions


@dataclass(frozen=True)
class ListingUnit:
    kind: str        # urls | images-split | images (one file) | webdataset | captures
    uri: str         # what this task lists
    listing: str     # the key its inputs are recorded under (the list file, or the source)
    source: int = 0  # index of its source in the config
    split: tuple[int, int] = (0, 1)   # this unit is split k of n of its source (or list file)


def file_signature(fs, path: str) -> dict:
    """What tells an unchanged list file: its size and ETag (object stores) or mtime."""
    info = fs.info(path)
    return {"size": int(info.get("size") or -1), "tag": signature_tag(info)}


def plan_listing(sources: list[Source], parent_listings: dict,
                 splits: int = 1) -> tuple[list[ListingUnit], dict, set]:
    """(units to list, signatures of the list files, listing keys skipped as unchanged).
    `splits`: how many tasks list each photo directory."""
    units, signatures, skipped = [], {}, set()
    for index, source in enumerate(sources):
        fs, root = fs_and_path(source.uri)
        if not fs.exists(root):
            # a missing source is a config mistake: fail before building a version without it
            raise DataError(f"{source.kind} source {source.uri} does not exist")
        key = url_of(fs, root)
        if source.kind == "urls":
            signatures[key] = file_signature(fs, root)
            if parent_listings.get(key) == signatures[key]:
                skipped.add(key)
            else:
                n = max(1, -(-signatures[key]["size"] // LIST_SPLIT_BYTES))
                units += [ListingUnit("urls", key, key, index, (k, n)) for k in range(n)]
        elif source.kind == "images" and fs.isdir(root):
            # the directory is never listed here (a flat prefix would cost the driver a row per
            # photo): each split task lists it and keeps its hash share of files and sub-trees
            units += [ListingUnit("images-split", key, key, index, (k, splits)) for k in range(splits)]
        else:
            units.append(ListingUnit(source.kind, key, key, index))
    return units, signatures, skipped


def list_unit(unit: ListingUnit, partitions: int, policy: InputPolicy) -> tuple[list[pa.Table], dict]:
    """Inputs (and source-level reject rows) of one unit, as one table per partition, and a
    summary (inputs found, a sample reject reason) for the driver."""
    if unit.kind == "urls":
        items, rejects = list_file_inputs(unit.uri, policy, unit.split)
    elif unit.kind == "images-split":
        items, rejects = list_directory_split(unit.uri, policy, unit.split)
    else:
        items, rejects = enumerate_source(Source(unit.kind, unit.uri), policy, allow_empty=True)
    buckets: list[list[dict]] = [[] for _ in range(partitions)]
    # input ids never hold a credential (`https://user:pass@host/...`); `uri` keeps it for the
    # fetch only, and the partition is keyed by the stripped form (what the ledger records)
    for item in items:
        key = strip_credentials(item.uri)
        buckets[partition_of(key, partitions)].append(
            {**item.to_row(), "input_id": strip_credentials(item.input_id), "listing": unit.listing,
             "stage": "", "reason": ""})
    for r in rejects:
        row = {k: r.get(k, d) for k, d in (("input_id", ""), ("kind", ""), ("uri", ""), ("frame", -1),
                                           ("member", ""), ("size", -1), ("stage", ""), ("reason", ""),
                                           ("tag", ""), ("list_pos", -1))}
        row["input_id"], row["uri"] = strip_credentials(row["input_id"]), strip_credentials(row["uri"])
        buckets[partition_of(row["uri"] or row["input_id"], partitions)].append({**row, "listing": unit.listing})
    summary = {"items": len(items), "rejects": len(rejects), "reject": rejects[0]["reason"] if rejects else ""}
    return [pa.Table.from_pylist(b, schema=LISTING_SCHEMA) for b in buckets], summary
