"""`pippo data build` and the versions made without one: `job` (run_build: the Ray job's driver),
`records` (the typed hand-offs: PartitionTask, PartitionPlan, PartitionResult, CommitSettings,
VersionPlan, CommitTotals), `listing` (listing units, routing inputs to partitions),
`partition_job` (process, dedup, write per partition), `commit` (the parts list, stats, preview,
then the version record), `maintenance` (takedowns and compaction)."""
