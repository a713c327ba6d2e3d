"""Handler of `pippo pipeline run CONFIG [k=v ...] [--resume RUN]` (parsing: pipelines.cli)."""
from __future__ import annotations

import json
import sys


def run(args) -> int:
    from pipelines.training.tracking import check_tracking_server

    check_tracking_server()      # first: seconds and one line, before configs, Ray or any step
    from pippo_common.config import load_config
    from pipelines.workflow.config import PipelineConfig
    from pipelines.workflow.dag import Workflow

    from pipelines.workflow.dag import StepFailed

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    try:
        result = Workflow(cfg, source=args.config).run(resume=args.resume)
    except StepFailed as exc:
        from pipelines.cli import _end_ray
        from pippo_common.errors import error_line, user_error_message

        _end_ray()                   # Ray's late forwarded lines first: the error line stays last
        print(error_line(str(exc)), file=sys.stderr)
        print(exc.run_id)            # the id --resume takes (the result line of a failed run)
        return 2 if user_error_message(exc.cause) is not None else 1    # input errors: 2, as documented
    for name, step in result["steps"].items():
        state = "cached" if step["cached"] else f"ran {step['seconds']} s"
        out = step["output"] if isinstance(step["output"], str) else json.dumps(step["output"])
        print(f"{name:<10} {state:<12} {out}")
    print(result["run_id"])
    return 0
