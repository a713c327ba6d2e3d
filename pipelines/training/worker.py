"""The per-worker training loop: a plain function of one JSON-able job dict.

Ray Train's TorchTrainer runs it on every worker (pipelines.training.launcher); it runs just as
well alone in one process or under torchrun (`launcher: local`), on a GPU host with only torch and
deepspeed installed. The job dict is fully resolved by the driver (absolute URIs, the model config
and the DeepSpeed config inlined), so a worker needs nothing from the driver's working directory.

One optimiser step = `optim.grad_accum` micro-batches of `data.batch_size` per rank. Progress is
counted in samples (EDM2 style). Checkpoints every `checkpoint.every_steps` and at the end; a run
finds its newest complete checkpoint on start and continues from it (step, optimiser, loader
position, EMA, MLflow run), after a killed worker (Ray Train restarts the group) or a re-run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import torch
import torch.distributed as dist

from pipelines.training.checkpoint import (CheckpointStore, barrier, final_name, load_safetensors,
                                           resolve_weights)
from pipelines.training.config import StageConfig
from pipelines.training.ema import ShardedEMA
from pipelines.training.engine import (DiffusionObjective, deepspeed_config, lr_at,
                                       resolve_precision, sample_grid, setup_distributed,
                                       step_generator, to_model_space)
from pipelines.weights import load_autoencoder
from pippo_common.checks import check_resolution

log = logging.getLogger("pippo.train")


def quiet_logs(verbose: bool = False, ray_worker: bool = False) -> None:
    """The one logging set-up (pippo_common.logs: redacted, on stderr, the CLI's levels); in a Ray
    worker ray_entry has set it up already and sent stdout to stderr, and pippo's records must not
    also reach Ray Train's root handler. DeepSpeed's logger reset itself on import: its level is
    applied again."""
    from pippo_common.logs import configure_once

    configure_once(1 if verbose else None, own_records=ray_worker)
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.distributed.*is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def train_worker(job: dict) -> dict:
    """Run (or resume) one training stage on this rank. Returns a summary (rank 0's is complete)."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # no "unable to detect" warning on CPU hosts
    import deepspeed

    from pippo_common.config import from_dict
    from pippo_model.config import ModelConfig
    from pippo_model.diffusion import CosineSchedule

    use_ray = job.get("launcher") == "ray"
    quiet_logs(job.get("verbose", False), ray_worker=use_ray)
    ctx = setup_distributed(use_ray)
    cfg: StageConfig = from_dict(StageConfig, job["stage"], source="<job>")
    model_cfg = ModelConfig(**job["model"]).for_stage(cfg.stage)
    store = CheckpointStore(job["run_uri"])
    resume = store.latest()
    done = store.final_at(cfg.steps)
    if done:               # this very output exists (immutable): hand it back, train nothing
        log.info("%s: already trained to step %d (%s)", store.uri, cfg.steps, store.url(done))
        summary = {**store.read_json(done, "info.json"), "checkpoint": store.url(done), "resumed": True}
        _report(use_ray, summary)
        return summary
    store.check_steps(cfg.steps, resume)       # the driver checked too; a worker never trains backwards

    model = initial_model(model_cfg, cfg.seed, cfg.init_from if resume is None else None)
    schedule = CosineSchedule(model_cfg.timesteps)
    objective = DiffusionObjective(model, schedule).to(ctx.device)
    precision = resolve_precision(cfg.precision, ctx.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(objective.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=ctx.device.type == "cuda")
    universal = bool(resume) and resume["world_size"] != ctx.world
    ds_cfg = deepspeed_config(job["deepspeed"], micro_batch=cfg.data.batch_size, grad_accum=o.grad_accum,
                              grad_clip=o.grad_clip, precision=precision, universal=universal)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_cfg)
    ema = ShardedEMA(engine.module, cfg.ema.decay, ctx.rank, ctx.world) if cfg.ema.enabled else None

    step, samples, loader_state = 0, 0, None
    if resume:
        store.load_into(engine, resume, ctx.world, ctx.local_rank)
        step, samples = resume["step"], resume["samples"]
        from dataprep.loader import TrainingLoader

        loader_state = TrainingLoader.merge_states(
            [json.loads(b) for b in store.read_rank_files(resume["dir"], "loader")])
        if ema is not None:
            from safetensors.torch import load

            ema.load([load(b) for b in store.read_rank_files(resume["dir"], "ema")], resume["ema_updates"])
        log.info("resumed %s at step %d (%d samples; saved by %d workers, now %d)", store.uri, step,
                 samples, resume["world_size"], ctx.world)
    if cfg.compile:
        engine.compile()

    from dataprep.loader import TrainingLoader

    # data.resolution may differ from the model's table size (post trains at a higher resolution:
    # the position tables are interpolated), but must fall on whole tokens
    check_resolution(cfg.data.resolution, model_cfg.vae_downsample * model_cfg.patch_size, "data.resolution")
    loader = TrainingLoader(cfg.sources, cfg.stage, cfg.data, rank=ctx.rank, world_size=ctx.world,
                            state=loader_state)
    autoencoder = load_autoencoder(model_cfg, ctx.device, cfg.vae_standin_seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tracker = _start_tracking(cfg, job, store, loader, model_cfg, ctx, fresh=resume is None) if ctx.is_main else None
    heldout = _heldout(loader, cfg, autoencoder, ctx.device, dtype)

    global_batch = cfg.data.batch_size * o.grad_accum * ctx.world
    it = iter(loader)
    window_loss, window_n, window_start, window_samples = torch.zeros((), device=ctx.device), 0, time.time(), 0
    run_start, run_start_samples = time.time(), samples
    last_metrics: dict = {}
    try:
        while step < cfg.steps:
            lr = lr_at(step, o.lr, o.warmup_steps, cfg.steps, o.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(o.grad_accum):
                batch = to_model_space(next(it), autoencoder, ctx.device, dtype)
                loss = engine(batch, step_generator(cfg.seed, step, micro, ctx.rank, ctx.device))
                engine.backward(loss)
                engine.step()
                window_loss += loss.detach().float()
                window_n += 1
            step += 1
            samples += global_batch
            window_samples += global_batch
            if ema is not None:
                ema.update()
            if step % cfg.tracking.log_every == 0 or step == cfg.steps:
                last_metrics = _log_window(engine, tracker, ctx, cfg, step, samples, lr, window_loss, window_n,
                                           window_samples / max(1e-9, time.time() - window_start),
                                           (samples - run_start_samples) / max(1e-9, time.time() - run_start))
                window_loss.zero_()
                window_n, window_start, window_samples = 0, time.time(), 0
            if heldout and (step % cfg.tracking.sample_every == 0 or step == cfg.steps):
                png, _ = sample_grid(engine.module.model, engine.module.schedule, autoencoder, heldout[0],
                                     heldout[1], cfg.tracking.sample_steps, cfg.seed)
                if tracker:
                    tracker.log_image(png, f"samples/step_{step:08d}.png", step=step)
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.steps:
                _save(store, engine, loader, ema, ctx, cfg, step, samples, tracker)
        summary = _finish(store, engine, ema, ctx, cfg, model_cfg, tracker, step, samples, last_metrics, heldout,
                          autoencoder)
    except BaseException:
        if tracker:
            tracker.flush()        # what was logged stays; the run stays RUNNING for the resume
        raise
    _report(use_ray, summary)
    return summary


# -- pieces of the loop ---------------------------------------------------------------------------------

def initial_model(model_cfg, seed: int, init_from: str | None):
    """The stage's model before training: seeded init (identical on every rank), then the previous
    stage's consolidated weights when `init_from` is set. Modules the new stage adds keep their
    zero init, so the model's output equals the previous stage's at step 0 (stage handoff)."""
    from pipelines.weights import read_model_json
    from pippo_model.model import build_model, load_stage_weights

    torch.manual_seed(seed)
    model = build_model(model_cfg)
    if init_from:
        weights_url, config_url = resolve_weights(init_from)
        source_cfg = read_model_json(config_url) if config_url else None
        new = load_stage_weights(model, load_safetensors(weights_url), source_cfg)
        log.info("initialised from %s (%d new tensors at their zero init)", weights_url, len(new))
    return model


def _start_tracking(cfg, job, store, loader, model_cfg, ctx, fresh: bool):
    from pippo_common.redact import redact
    from pippo_common.config import flatten, to_dict
    from pipelines.tracking import RunTracker

    run = store.read_json("run.json") if store.exists("run.json") else None
    tracker = RunTracker(cfg.tracking.experiment, cfg.resolved_run_name(), step_tag=cfg.stage,
                         parent_run_id=cfg.tracking.parent_run_id,
                         resume_run_id=run["mlflow_run_id"] if run else None,
                         system_metrics=cfg.tracking.system_metrics,
                         tags={"pippo.run_uri": store.uri, "pippo.code_version": job.get("code_version", "")})
    if run is None:
        # redacted here, before the checkpoint store writes it: expanded secret ${VAR}s go back
        # to ${VAR} (readers of run.json use its model/stage keys, never a credential)
        # "model": what a resume is checked against on the driver (pipelines.training.compat)
        store.write_json({"mlflow_run_id": tracker.run_id, "stage": cfg.stage, "config": redact(to_dict(cfg)),
                          "model": redact(job["model"])}, "run.json")
    if fresh:
        params = flatten(to_dict(cfg))
        params.update({f"model.{k}": v for k, v in flatten(dataclasses.asdict(model_cfg)).items()})
        params.update({"deepspeed.zero_stage": job["deepspeed"].get("zero_optimization", {}).get("stage", 0),
                       "world_size": ctx.world})
        tracker.log_params(params)
        for source, version in zip(cfg.sources, loader.versions):
            tracker.log_dataset(source.dataset, version["id"], name=source.dataset.rsplit("/", 1)[-1].split("@")[0])
    return tracker


def _heldout(loader, cfg, autoencoder, device, dtype):
    """(pixel batch, model-space batch) of held-out samples for sample grids, or None."""
    if not cfg.tracking.sample_every:
        return None
    try:
        pixel = loader.heldout_batch(cfg.tracking.sample_count)
    except Exception as exc:  # no held-out samples configured or available: grids are skipped
        log.info("no sample grids: %s", exc)
        return None
    return pixel, to_model_space(pixel, autoencoder, device, dtype)


def _log_window(engine, tracker, ctx, cfg, step, samples, lr, window_loss, window_n, rate_now, rate_run):
    loss = window_loss / max(1, window_n)
    if ctx.world > 1:
        dist.all_reduce(loss)
        loss = loss / ctx.world
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    metrics = {"train/loss": loss.item(), "train/lr": lr, "train/samples_per_s": rate_now,
               "train/grad_norm": grad_norm, "train/samples": float(samples)}
    if tracker:
        tracker.log_metrics(metrics, step)
        eta = (cfg.steps - step) * cfg.data.batch_size * cfg.optim.grad_accum * ctx.world / max(rate_run, 1e-9)
        log.info("%s step %d/%d (%.0f%%) | %d samples | loss %.4f | lr %.2e | grad %.3f | %.1f samples/s | ETA %s",
                 cfg.stage, step, cfg.steps, 100 * step / cfg.steps, samples, metrics["train/loss"], lr,
                 grad_norm, rate_now, _hms(eta))
    return metrics


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _save(store, engine, loader, ema, ctx, cfg, step, samples, tracker):
    from safetensors.torch import save

    files = {f"loader/rank{ctx.rank:05d}.json": json.dumps(loader.state_dict()).encode()}
    if ema is not None:
        files[f"ema/rank{ctx.rank:05d}.safetensors"] = save(ema.local_state(), metadata=ema.metadata())
    state = {"samples": samples, "world_size": ctx.world, "zero_stage": engine.zero_optimization_stage(),
             "ema_updates": ema.updates if ema is not None else 0, "stage": cfg.stage}
    url = store.save(engine, step, files, state, cfg.checkpoint.keep_last)
    if tracker:
        tracker.flush()
        log.info("checkpoint %s", url)


@torch.no_grad()
def full_fp32_weights(engine) -> dict[str, torch.Tensor]:
    """The trained weights, whole, fp32 (collective under ZeRO: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def _strip(state: dict) -> dict:
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _finish(store, engine, ema, ctx, cfg, model_cfg, tracker, step, samples, last_metrics, heldout, autoencoder):
    raw = _strip(full_fp32_weights(engine))
    weights = _strip(ema.full_state_dict()) if ema is not None else raw
    summary = {"stage": cfg.stage, "step": step, "samples": samples, "checkpoint": store.url(final_name(step)),
               "run_uri": store.uri, "loss": last_metrics.get("train/loss")}
    if ctx.is_main:
        model_json = dataclasses.asdict(model_cfg)
        if tracker:
            summary["mlflow_run_id"] = tracker.run_id
        url = store.write_final(weights, raw if ema is not None else None, model_json, summary, step)
        if tracker:
            tracker.set_tags({"pippo.checkpoint": url})
            if cfg.tracking.register_model:
                name = cfg.tracking.register_model.format(stage=cfg.stage)
                summary["model_version"] = tracker.register_model(name, url)
            tracker.end("FINISHED")
        log.info("%s finished at step %d: %s/model.safetensors", cfg.stage, step, url)
    barrier()
    return summary


def _report(use_ray: bool, summary: dict) -> None:
    if not use_ray:
        return
    import ray.train

    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None})


def ray_entry(job: dict) -> None:
    """TorchTrainer's train_loop_per_worker: the job's environment first (remote workers do not
    inherit the driver's), then the plain loop."""
    import os

    # The driver's stdout carries the command's result (SPEC §2: the last line); Ray forwards a
    # worker's stdout there, so the worker's prints (DeepSpeed's among them) go to stderr instead.
    os.dup2(2, 1)
    from pippo_common.logs import setup_worker

    setup_worker()        # redacted logs and prints even where the runtime_env hook did not run
    if job.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = job["tracking_uri"]
    from pipelines.training.compat import input_error

    try:
        train_worker(job)
    except Exception as exc:
        # a retry cannot fix a bad config, data or checkpoint: the controller ends the run on it
        if (carried := input_error(exc)) is not None and carried is not exc:
            raise carried from None
        raise
