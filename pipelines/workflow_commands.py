"""Handler of `pippo pipeline run CONFIG [k=v ...] [--resume RUN]` (parsing: pipelines.cli)."""
from __future__ import annotations

import json
import sys


def run(args) -> int:
    from pipelines.config import load_config
    from pipelines.workflow.config import PipelineConfig
    from pipelines.workflow.dag import Workflow

    from pipelines.workflow.dag import StepFailed

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    try:
        result = Workflow(cfg, source=args.config).run(resume=args.resume)
    except StepFailed as exc:
        print(f"pippo: error: {exc}", file=sys.stderr)
        return 1
    for name, step in result["steps"].items():
        state = "cached" if step["cached"] else f"ran {step['seconds']} s"
        out = step["output"] if isinstance(step["output"], str) else json.dumps(step["output"])
        print(f"{name:<10} {state:<12} {out}")
    print(result["run_id"])
    return 0
