"""Handler of `pippo train CONFIG [k=v ...]` (argument parsing lives in pipelines.cli)."""
from __future__ import annotations

import json
import logging

log = logging.getLogger("pippo.train")


def train(args) -> int:
    from pipelines.training.tracking import check_tracking_server

    check_tracking_server()     # before the heavy imports: a stopped server is one line in seconds
    from pipelines.training.launcher import load_stage_config, run_stage

    cfg = load_stage_config(args.config, args.overrides)
    if getattr(args, "local", False):
        cfg.resources.ray = False
    try:
        summary = run_stage(cfg, verbose=args.verbose)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(where_stopped(cfg)) from None
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str))
        return 0
    print(f"{cfg.stage}: step {summary.get('step')}, loss {summary.get('loss')}, "
          f"MLflow run {summary.get('mlflow_run_id', '?')}")
    print(summary.get("checkpoint", ""))
    return 0


def where_stopped(cfg) -> str:
    """After Ctrl-C: the run, its newest complete checkpoint, and how to continue from it."""
    from pipelines.training.checkpoint import CheckpointStore

    try:
        store = CheckpointStore(cfg.run_uri())
        latest = store.latest()
    except Exception:  # noqa: BLE001 - interrupted before the run existed, or its store is unreadable
        return "stopped before the run started; nothing to continue"
    if latest is None:
        return f"run {store.uri} stopped before its first checkpoint; the same command starts it again"
    return (f"run {store.uri} stopped; its newest checkpoint is step {latest['step']} ({store.url(latest['dir'])}); "
            f"the same command continues from it")
