"""`pippo compare [--experiment NAME] [--out DIR] [--json]`: the runs of one MLflow experiment
(pipelines.compare builds the document and the plots)."""
from __future__ import annotations

import json

from pipelines.cli.args import add_command, json_flag


def register(top) -> None:
    p = add_command(top, "compare", compare, "MLflow comparison table and plots",
                    "Compare the runs of one MLflow experiment (MLFLOW_TRACKING_URI): one row per run tagged "
                    "pippo.step, parent pipeline runs with their step runs below them, the dataset version each "
                    "trained on, the params that DIFFER between the runs, the final train/loss and eval metrics, "
                    "the checkpoint. Plots (PNG) into --out: train/loss curves per stage and eval metrics per run."
                    "\n\nexamples:\n"
                    "  pippo compare                                  # the demo's experiment (or the newest one)\n"
                    "  pippo compare --experiment pippo-demo --out out/compare\n"
                    "  pippo compare --experiment test-post --json | jq '.runs[].metrics'")
    p.add_argument("--experiment", help="experiment name (default: configs/pipelines/demo.yaml's "
                                        "experiment, else the most recently active one)")
    p.add_argument("--out", default=None,
                   help="directory for the PNG plots (default out/compare; with --json, no plots unless --out)")
    json_flag(p)


def compare(args) -> int:
    from pipelines.tracking import check_tracking_server

    check_tracking_server()        # before mlflow's import (seconds on a busy machine)
    from pipelines.compare import compare as build, render_text

    # --json is for scripts: it prints the document and writes nothing unless asked (--out)
    doc = build(args.experiment, args.out or (None if args.json else "out/compare"))
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        print(render_text(doc))
    return 0
