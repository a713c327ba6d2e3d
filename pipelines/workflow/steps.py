"""What each kind of workflow step does. A step gets its resolved config (upstream outputs already
substituted) and returns (output, MLflow run id); everything heavy it starts runs on Ray (the build's
tasks, Ray Train's workers), and the step itself runs as a Ray task (pipelines.workflow.dag).

    synth     synthetic studio captures + photos (the demo's raw data)   -> {"captures", "photos"}
    dataprep  `pippo data build` (dataprep.build.job.run_build)               -> "URI@version-id"
    train     `pippo train` (pipelines.training.launcher.run_stage)      -> its final-step_N/ checkpoint URI
    eval      pipelines.evaluation.run_eval                               -> {metric: value}
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pippo_common.redact import redact
from pippo_common.config import flatten, from_dict, load_config, merge, read_yaml, to_dict

log = logging.getLogger("pippo.workflow")


def step_config(kind: str, config_path: str | None, overrides: dict, params: dict):
    """The typed config of a step (YAML + overrides), or the params dict of a synth step. Loading
    it here, on the driver, is what makes a bad config fail before anything runs."""
    if kind == "synth":
        return dict(params)
    if kind == "dataprep":
        from dataprep.build_config import BuildConfig
        return load_config(BuildConfig, config_path, data=overrides)
    if kind == "train":
        from pipelines.training.config import StageConfig
        return load_config(StageConfig, config_path, data=overrides)
    from pipelines.evaluation import EvalConfig
    raw = merge(read_yaml(config_path), overrides) if config_path else overrides
    return from_dict(EvalConfig, raw, source=config_path or "<eval step>")


def normalised(kind: str, cfg) -> dict:
    """The step config as the cache key sees it: plain data, no run-local fields."""
    d = dict(cfg) if kind == "synth" else to_dict(cfg)
    if kind == "train":
        d.get("tracking", {}).pop("parent_run_id", None)
    return d


def run_step(kind: str, name: str, cfg, ctx: dict) -> tuple[object, str | None]:
    """ctx: {"pipeline", "experiment", "parent_run_id", "workdir", "key"}."""
    if kind == "synth":
        return _synth(name, cfg, ctx)
    if kind == "dataprep":
        return _dataprep(name, cfg, ctx)
    if kind == "train":
        return _train(cfg, ctx)
    return _eval(cfg, ctx)


def _child_run(name: str, kind: str, ctx: dict):
    from pipelines.tracking import RunTracker

    from pipelines.workflow.config import STEP_TAGS
    return RunTracker(ctx["experiment"], f"{ctx['pipeline']}/{name}", step_tag=STEP_TAGS[kind] or "dataprep",
                      parent_run_id=ctx["parent_run_id"], system_metrics=False,
                      tags={"pippo.workflow_step": name, "pippo.cache_key": ctx["key"]})


def _synth(name: str, params: dict, ctx: dict):
    from dataprep.studio.synth import synth_capture, synth_images

    # named by the params alone (not the cache key, which includes the code version): re-rendering
    # after a code change writes the same files to the same paths, so the build sees the same
    # inputs, the version id stays, and the trained stages downstream are found finished
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(ctx["workdir"]) / f"{name}-{digest}"
    captures, photos = out / "captures", out / "photos"
    seed = int(params.get("seed", 0))
    for k in range(int(params.get("captures", 2))):
        synth_capture(captures / f"capture_{seed:04d}_{k:03d}", cameras=int(params.get("cameras", 8)),
                      frames=int(params.get("frames", 3)), height=int(params.get("height", 384)),
                      width=int(params.get("width", 252)), seed=seed * 1000 + k)
    synth_images(photos, int(params.get("photos", 48)), seed)
    output = {"captures": str(captures.resolve()), "photos": str(photos.resolve())}
    with _child_run(name, "synth", ctx) as run:
        run.log_params({"synth." + k: v for k, v in params.items()})
        run.set_tags({"pippo.output": str(out.resolve())})
    return output, run.run_id


def _dataprep(name: str, cfg, ctx: dict):
    from dataprep.build.job import run_build

    vid = run_build(cfg, redact(to_dict(cfg)))     # the record keeps secret ${VAR}s as ${VAR}
    output = f"{cfg.dataset}@{vid}"
    with _child_run(name, "dataprep", ctx) as run:
        run.log_params(flatten(to_dict(cfg)))
        run.log_dataset(cfg.dataset, vid, name=os.path.basename(cfg.dataset.rstrip("/")), context="output")
        run.set_tags({"pippo.output": output, "pippo.dataset_version": vid})
    return output, run.run_id


def _train(cfg, ctx: dict):
    from pipelines.training.launcher import run_stage

    cfg.tracking.parent_run_id = ctx["parent_run_id"]
    cfg.tracking.experiment = ctx["experiment"]
    summary = run_stage(cfg)
    return summary["checkpoint"], summary.get("mlflow_run_id")


def _eval(cfg, ctx: dict):
    from pipelines.evaluation import run_eval

    cfg.experiment = ctx["experiment"]
    result = run_eval(cfg, parent_run_id=ctx["parent_run_id"])
    metrics = {k: v for k, v in result.items() if k.startswith("eval/")}
    return metrics, result.get("run_id")
