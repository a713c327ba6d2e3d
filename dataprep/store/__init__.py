"""The versioned dataset store, bottom up: `core` (DatasetStore: the root, refs, tags, version and
part records, table and shard IO, build leases), `ledger` (part records, ledger rows, parts lists
and ledger replay: above the core), `shards` (the shard writer and index), `shard_reader` (ranged
member reads), `reader` (a version as plain samples), `gc` (what no version, tag or live build
references). The core imports neither ledger nor gc."""
