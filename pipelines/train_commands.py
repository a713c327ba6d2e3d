"""Handler of `pippo train CONFIG [k=v ...]` (argument parsing lives in pipelines.cli)."""
from __future__ import annotations

import json
import logging

log = logging.getLogger("pippo.train")


def train(args) -> int:
    from pipelines.training.launcher import load_stage_config, run_stage

    cfg = load_stage_config(args.config, args.overrides)
    if getattr(args, "local", False):
        cfg.resources.ray = False
    summary = run_stage(cfg, verbose=args.verbose)
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str))
        return 0
    print(f"{cfg.stage}: step {summary.get('step')}, loss {summary.get('loss')}, "
          f"MLflow run {summary.get('mlflow_run_id', '?')}")
    print(summary.get("checkpoint", ""))
    return 0
