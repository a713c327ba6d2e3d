"""`pippo pipeline run CONFIG [k=v ...] [--resume RUN]`: the workflow DAG (pipelines.workflow)."""
from __future__ import annotations

import json
import sys

from pipelines.cli.args import add_command, add_group


def register(top) -> None:
    psub = add_group(top, "pipeline", "the workflow DAG", "Workflow commands.", "pipeline_command")
    p = add_command(psub, "run", run, "run the workflow DAG (cached, resumable)",
                    "Run a DAG of steps (synth, dataprep, train, eval) declared in YAML. Each step is cached by a "
                    "hash of code, config and input artifact ids (dataset versions, checkpoints): a re-run skips "
                    "finished steps, a changed config re-runs only that step and what is downstream of it. One "
                    "MLflow parent run per invocation, a child run per step; prints the parent run id last."
                    "\n\nexamples:\n"
                    "  pippo pipeline run configs/pipelines/demo.yaml\n"
                    "  pippo pipeline run configs/pipelines/demo.yaml steps.post.overrides.steps=200\n"
                    "  pippo pipeline run configs/pipelines/demo.yaml steps.eval.enabled=false\n"
                    "  pippo pipeline run configs/pipelines/demo.yaml --resume 3f2a...   # continue a failed run")
    p.add_argument("config", help="pipeline config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", metavar="RUN", help="resume this pipeline run id")


def run(args) -> int:
    from pipelines.tracking import check_tracking_server

    check_tracking_server()      # first: seconds and one line, before configs, Ray or any step
    from pippo_common.config import load_config
    from pipelines.workflow.config import PipelineConfig
    from pipelines.workflow.dag import Workflow

    from pipelines.workflow.dag import StepFailed

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    try:
        result = Workflow(cfg, source=args.config).run(resume=args.resume)
    except StepFailed as exc:
        from pipelines.cli.shutdown import end_ray
        from pippo_common.errors import error_line, user_error_message

        end_ray()                    # Ray's late forwarded lines first: the error line stays last
        print(error_line(str(exc)), file=sys.stderr)
        print(exc.run_id)            # the id --resume takes (the result line of a failed run)
        return 2 if user_error_message(exc.cause) is not None else 1    # input errors: 2, as documented
    for name, step in result["steps"].items():
        state = "cached" if step["cached"] else f"ran {step['seconds']} s"
        out = step["output"] if isinstance(step["output"], str) else json.dumps(step["output"])
        print(f"{name:<10} {state:<12} {out}")
    print(result["run_id"])
    return 0
