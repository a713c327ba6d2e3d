"""Parts: what one partition job of one build decided, written as immutable files.

A part is a ledger file (a row per input it decided) plus the shards holding its kept samples and
a small JSON record written LAST (its existence means the part is complete). Versions list parts;
see dataprep/store/core.py for the layout and how ledgers replay.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from dataprep.store.core import DatasetStore, canonical_digest

# status: kept | rejected | removed. listing = the list file or source that listed the input
# (how the next build tells "gone from its source" from "its list file was not re-read");
# attempts = how often a passing failure (fetch, error) was tried; shard = where a kept sample is.
# size + tag (ETag or mtime, as listed): a photo whose listing differs was changed in place and is
# read again (its old sample removed under `{input}#replaced={sha256[:16]}`, see partition_job);
# list_pos = the entry's place in its list file (`listing`): a retry re-reads its row there, as
# the credentials it may hold are never stored.
LEDGER_SCHEMA = pa.schema([("input", pa.string()), ("status", pa.string()), ("key", pa.string()),
                           ("sha256", pa.string()), ("kind", pa.string()), ("uri", pa.string()),
                           ("listing", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("size", pa.int64()), ("attempts", pa.int32()), ("shard", pa.string()),
                           ("tag", pa.string()), ("list_pos", pa.int64())])
SHA_SCHEMA = pa.schema([("sha256", pa.string()), ("input", pa.string())])


def ledger_row(**kw) -> dict:
    row = {"input": "", "status": "", "key": "", "sha256": "", "kind": "", "uri": "", "listing": "",
           "stage": "", "reason": "", "size": -1, "attempts": 0, "shard": "",
           "tag": "", "list_pos": -1}
    row.update({k: v for k, v in kw.items() if k in row})
    return row


def part_id(*fields) -> str:
    """Deterministic part name: a re-run of the same work finds (and reuses) the same part."""
    return hashlib.sha256("\n".join(map(str, fields)).encode()).hexdigest()[:20]


def reason_class(stage: str, reason: str) -> str:
    """A reject's category for summaries: its stage and the reason text before any number, path
    or detail (`aspect 3.06 > 3.0` -> `decode: aspect`; details stay in the ledger)."""
    head = re.split(r"[\d(:/'\"]| of | after ", reason, maxsplit=1)[0].strip(" <>=,.-")
    return f"{stage}: {head[:48] or 'other'}"


def write_part(store: DatasetStore, recipe: str, part: str, partition: int, kind: str,
               rows: list[dict], shards: list[dict] = (), drops: list[str] = (),
               schema: pa.Schema = LEDGER_SCHEMA, extra: dict | None = None) -> dict:
    """Write a part's table, then its record (last). `rows` are ledger rows (kind 'ledger') or
    sha index rows (kind 'sha'); counts are the part's deltas to the version totals."""
    suffix = ".ledger.parquet" if kind == "ledger" else ".sha.parquet"
    table_url = store.url("parts", recipe, f"{part}{suffix}")
    table = pa.Table.from_pylist(list(rows), schema=schema)
    store.write_table(table_url, table)
    shards = [{**s, "url": store.rel(s["url"]), "index_url": store.rel(s["index_url"])} for s in shards]
    record = {"part": part, "recipe": recipe, "partition": partition, "kind": kind,
              "shards": shards, "drops": sorted(drops), "ledger_url": store.rel(table_url),
              "table_digest": canonical_digest(sorted(map(str, table.to_pylist()))), **(extra or {})}
    record["digest"] = canonical_digest(record)
    store.write_json(store.part_path(recipe, part), record)
    return record


def ledger_counts(rows: list[dict], previous: dict[str, dict]) -> Counter:
    """Deltas to the version's totals from rows superseding `previous` (input -> last row)."""
    delta = Counter()
    for r in rows:
        old = previous.get(r["input"])
        if old is None:
            delta["inputs"] += 1
        else:
            delta[old["status"]] -= 1
        delta[r["status"]] += 1
        if r["status"] == "rejected":
            delta[f"reason|{reason_class(r['stage'], r['reason'])}"] += 1
        if old is not None and old["status"] == "rejected":
            delta[f"reason|{reason_class(old['stage'], old['reason'])}"] -= 1
        if r["status"] == "kept":
            delta[f"kind|{_sample_kind(r)}"] += 1
        if old is not None and old["status"] == "kept":
            delta[f"kind|{_sample_kind(old)}"] -= 1
    return delta


def _sample_kind(row: dict) -> str:
    return "studio" if row["kind"] == "studio" else "image"


def part_row(store: DatasetStore, record: dict) -> dict:
    """A part's row in a version's parts list."""
    return {"part": record["part"], "partition": record["partition"], "kind": record["kind"],
            "digest": record["digest"], "url": store.rel(store.part_path(record["recipe"], record["part"])),
            "ledger_url": record["ledger_url"]}


# A version's parts list (`show --json`'s rejects_url): url = the part record; ledger_url = its
# table (a ledger of input rows: input, status, stage, reason, ...; or, kind "sha", the sha index)
PARTS_SCHEMA = pa.schema([("part", pa.string()), ("partition", pa.int32()), ("kind", pa.string()),
                          ("digest", pa.string()), ("url", pa.string()), ("ledger_url", pa.string())])


# -- replay: a version's ledger is its parts' ledgers in order, the last row of an input winning

def replay(tables: list[pa.Table]) -> pa.Table:
    """Ledger tables in order -> one row per input, the last one winning."""
    if not tables:
        return LEDGER_SCHEMA.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    last: dict[str, int] = {}
    for i, name in enumerate(table.column("input").to_pylist()):
        last[name] = i
    return table.take(sorted(last.values()))


def ledger(store: DatasetStore, record: dict, partition: int | None = None) -> pa.Table:
    """The version's input ledger (of one partition), replayed: the last row of an input wins."""
    parts = [p for p in store.version_parts(record, partition) if p["kind"] == "ledger"]
    return replay([store.read_table(r["ledger_url"]) for r in store.part_records(parts)])


def ledger_state(store: DatasetStore, records: list[dict]) -> dict[str, dict]:
    """input -> its last ledger row, over the given part records (in order)."""
    return {r["input"]: r for r in replay([store.read_table(r["ledger_url"]) for r in records]).to_pylist()}


def rejects(store: DatasetStore, record: dict) -> pa.Table:
    table = ledger(store, record)
    return table.filter(pc.equal(table["status"], "rejected")).select(["input", "stage", "reason"])
