"""Shared leaf package: one home for each concept every other package uses.

Module map. `errors` is the one UserError family and the one way a command reports a failure
(one redacted `pippo: error: ...` line, exit 2; a traceback and exit 1 for a bug); `text` makes
text fit for one terminal line; `redact` is the project's one redactor (credentials are never
stored, logged or printed); `logs` is the logging set-up of the CLI, Ray workers and training
workers; `storage` holds the fsspec I/O helpers (URL -> filesystem, atomic writes, regular-file
opens); `ray_start` starts or joins Ray the one way (log levels, redaction hook, stderr routing);
`versions` is the one code version (package label and source digest: cache keys, records, MLflow
tags); `config` loads YAML/JSON into typed dataclasses (overrides, `${VAR}` expansion, paths);
`checks` holds small validations shared by several commands (resolution multiples).

This package imports nothing from dataprep, pipelines, pippo_model or cluster (tests/unit/
test_common.py checks it), so any of them can import it without a cycle.
"""
