"""`pippo train CONFIG [k=v ...]`: one training stage (pipelines.training.launcher does the work)."""
from __future__ import annotations

import json
import logging

from pipelines.cli.args import add_command, json_flag

log = logging.getLogger("pippo.train")


def register(top) -> None:
    p = add_command(top, "train", train, "one training stage (pretrain, mid or post)",
                    "Train one stage with DeepSpeed ZeRO under Ray Train (TorchTrainer, `workers` workers), "
                    "checkpoints on any fsspec URL, tracked in MLflow. Re-running the same command resumes "
                    "the run from its newest complete checkpoint.\n\nexamples:\n"
                    "  pippo train configs/stages/pretrain.yaml\n"
                    "  pippo train configs/stages/mid.yaml workers=4 deepspeed=configs/deepspeed/zero3.json\n"
                    "  pippo train configs/stages/post.yaml init_from=s3://bucket/ckpt/mid-1a2b3c4d5e "
                    "checkpoint.root=s3://bucket/ckpt\n"
                    "  pippo train configs/stages/pretrain.yaml --local   # no Ray: this process (or torchrun)")
    p.add_argument("config", help="stage config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--local", action="store_true",
                   help="run the per-worker loop in this process instead of Ray Train (1 rank, or torchrun's)")
    json_flag(p)


def train(args) -> int:
    from pipelines.tracking import check_tracking_server

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
