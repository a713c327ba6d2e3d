"""Launching a stage: resolve the config on the driver, then Ray Train's TorchTrainer over
`train_worker` on `workers` workers (or the worker function in this process).

Resolution happens here, once: the model YAML (+ model_overrides) and the DeepSpeed JSON are read
and inlined, local paths become absolute URLs, the MLflow tracking URI is fixed. Ray workers may
start in another directory (or on another machine): the job dict is all they need.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile

from pippo_common.config import ConfigError, load_config, read_json_config, to_dict
from pipelines.training.config import StageConfig
from pippo_common.checks import check_resolution
from pippo_common.errors import Failed

log = logging.getLogger("pippo.train")


def resolve_job(cfg: StageConfig, *, verbose: bool = False) -> dict:
    """The JSON-able job every worker receives."""
    from pippo_common.versions import code_version
    from pippo_common.storage import absolute_url
    from pipelines.weights import load_model_config
    from pipelines.tracking import check_tracking_server, tracking_uri
    from pippo_model.config import ModelConfig

    check_tracking_server()         # first: seconds, before Ray or any data is touched
    model_cfg: ModelConfig = load_model_config(cfg.model, [f"{k}={json.dumps(v)}" for k, v in
                                                           cfg.model_overrides.items()])
    try:
        model_cfg = model_cfg.for_stage(cfg.stage)
    except ValueError as exc:
        raise ConfigError(f"{cfg.model}: {exc}") from None
    if model_cfg.space == "latent" and not model_cfg.vae_path and cfg.vae_standin_seed is None:
        raise ConfigError(f"{cfg.model}: the model is latent-space but has no vae_path: set "
                          f"model_overrides.vae_path to a diffusers AutoencoderKL directory or URI")
    check_resolution(cfg.data.resolution, model_cfg.vae_downsample * model_cfg.patch_size, "data.resolution")
    ds = read_json_config(cfg.deepspeed, "deepspeed config")     # a regular file, size-capped
    if not isinstance(ds, dict):
        raise ConfigError(f"{cfg.deepspeed}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")

    if cfg.init_from:            # before the datasets are read: the cheaper mistake first
        from pipelines.training.compat import check_init_from

        # (a resumed run started from the same init_from: it is part of the run's name)
        check_init_from(absolute_url(cfg.init_from), model_cfg, cfg.stage)
    pin_datasets(cfg)
    stage = to_dict(cfg)
    if cfg.init_from:
        stage["init_from"] = absolute_url(cfg.init_from)
    stage["run_name"] = cfg.resolved_run_name()    # computed here, where the config files are
    from pippo_common.config import expand_env

    stage["checkpoint"]["root"] = absolute_url(expand_env(cfg.checkpoint.root))
    run_uri = absolute_url(cfg.run_uri())
    from pipelines.training.checkpoint import CheckpointStore
    from pipelines.training.compat import check_resume

    store = CheckpointStore(run_uri)
    resume = store.latest()
    store.check_steps(cfg.steps, resume)       # fewer steps than the run has: one line, here
    if resume:                   # a planted file is refused here, in one line, before Ray starts
        store.verify_step(resume["dir"])
    # stage and model must fit the run being resumed / the weights it starts from: one line here,
    # before Ray, not an error on every worker (pipelines.training.compat)
    check_resume(store, resume, cfg.stage, dataclasses.asdict(model_cfg))
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()       # workers inherit it (local Ray) ...
    return {"stage": stage, "model": dataclasses.asdict(model_cfg), "deepspeed": ds, "run_uri": run_uri,
            "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],  # ... or read it here (remote workers)
            "code_version": code_version(), "verbose": verbose}


def pin_datasets(cfg: StageConfig) -> StageConfig:
    """URI@REF -> absolute URI@version-id, in place (idempotent): every worker and every resume of
    the run reads the same version even when `latest` or a tag moves, and the run's name (a hash
    of the config) names the version — a new version is a new run."""
    from pippo_common.storage import absolute_url
    from dataprep.store.core import DatasetStore, split_ref

    def pinned(ref: str) -> str:
        uri, name = split_ref(ref)
        return f"{absolute_url(uri)}@{DatasetStore(uri).resolve(name)['id']}"

    cfg.dataset = pinned(cfg.dataset)
    for m in cfg.mix:
        m.dataset = pinned(m.dataset)
    return cfg


def load_stage_config(path, overrides=()) -> StageConfig:
    return load_config(StageConfig, path, overrides)


def run_stage(cfg: StageConfig, *, verbose: bool = False) -> dict:
    """Train one stage; returns rank 0's summary (checkpoint URI, MLflow run id, final loss...)."""
    job = resolve_job(cfg, verbose=verbose)
    log.info("%s: %s, run %s, dataset %s", cfg.stage,
             f"{cfg.workers} Ray Train worker(s)" if cfg.resources.ray else "in this process",
             job["run_uri"], cfg.dataset)
    if not cfg.resources.ray:
        from pipelines.training.worker import train_worker

        job["launcher"] = "local"
        return train_worker(job)
    return _run_on_ray(cfg, job)


def _run_on_ray(cfg: StageConfig, job: dict) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pippo_common.ray_start import ensure_ray
    from pipelines.training.compat import end_on_input_error, find_input_error
    from pipelines.training.worker import ray_entry

    ensure_ray(dashboard=True)
    r = cfg.resources
    use_gpu = r.use_gpu if r.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    per_worker = {"CPU": r.cpus_per_worker, **r.custom}
    if use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    job["launcher"] = "ray"
    storage_path, remove_storage = ray_train_storage()
    trainer = TorchTrainer(
        ray_entry, train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=job["stage"]["run_name"], failure_config=FailureConfig(max_failures=r.max_failures),
                             # an input error in a worker ends the run instead of being retried
                             callbacks=[end_on_input_error()],
                             storage_path=storage_path))
    try:
        result = _fit_interruptibly(trainer)  # Ray Train v2 raises TrainingFailedError ...
        error = result.error                  # ... v1 returned it
    except ray.train.TrainingFailedError as exc:
        error = exc
    finally:
        remove_storage()
    if error:
        input_error = find_input_error(error)
        if input_error is not None:
            from pippo_common.errors import UserError

            raise UserError(str(input_error)) from None
        raise StageFailed(job["run_uri"], error) from None
    return _summary(job["run_uri"], cfg.steps)


def _fit_interruptibly(trainer):
    """trainer.fit() in a helper thread, so that Ctrl-C stays a KeyboardInterrupt here. On the main
    thread Ray Train v2 installs its own SIGINT handler, which aborts the run and then exits 0 or
    1 without a word (ray.train.v2 DataParallelTrainer._register_sigint_handler); the command must
    instead say where the run stopped. The workers end with this driver (its Ray shuts down); the
    run continues from its newest checkpoint when the command is run again."""
    import threading

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="pippo-ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)                      # a join with a timeout lets SIGINT through
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class StageFailed(Failed):
    """Training failed in the workers beyond the retries (not an input error): one line naming the
    last error and how to continue; Ray Train's log above holds the tracebacks."""

    def __init__(self, run_uri: str, error: BaseException):
        from pipelines.training.checkpoint import CheckpointStore

        lines = [line for line in str(error).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else type(error).__name__
        try:
            latest = CheckpointStore(run_uri).latest()
        except Exception:  # noqa: BLE001 - the message must not fail on a broken store
            latest = None
        where = f"newest checkpoint: step {latest['step']}" if latest else "no checkpoint yet"
        super().__init__(f"training failed in the Ray workers ({type(error).__name__}: {last}); run {run_uri}, "
                         f"{where}; re-run the same command to continue")


def ray_train_storage():
    """Ray Train's storage_path and how to remove it after the run: PIPPO_RAY_RESULTS when set
    (kept), else a private temporary directory. Ray Train keeps only its own bookkeeping there
    (checkpoints and results live in the CheckpointStore and MLflow): a default under the working
    directory left `./.pippo/ray_results` behind each run, whatever the store."""
    if os.environ.get("PIPPO_RAY_RESULTS"):
        return os.path.abspath(os.environ["PIPPO_RAY_RESULTS"]), lambda: None
    scratch = tempfile.mkdtemp(prefix="pippo-ray-train-")
    return scratch, lambda: shutil.rmtree(scratch, ignore_errors=True)


def _summary(run_uri: str, steps: int) -> dict:
    """Rank 0's summary, from the run's storage (Ray Train keeps no metrics reported without a
    checkpoint, and the storage is the truth anyway)."""
    from pipelines.training.checkpoint import CheckpointStore

    store = CheckpointStore(run_uri)
    final = store.final_at(steps)
    if final is None:
        raise RuntimeError(f"{run_uri}: training ended without a final at step {steps}")
    summary = {**store.read_json(final, "info.json"), "checkpoint": store.url(final)}
    if store.exists("run.json"):
        summary.setdefault("mlflow_run_id", store.read_json("run.json")["mlflow_run_id"])
    return summary


def config_summary(cfg: StageConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
