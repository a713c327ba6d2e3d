"""The typed job config of one training stage (`pippo train CONFIG`), SPEC §2 keys first.

YAML files: configs/stages/{pretrain,mid,post}.yaml. Everything is checked on load (unknown key,
bad value: one line naming key, value and file), before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from dataprep.loader.config import DataSource, LoaderConfig
from dataprep.names import validate_name
from pippo_common.redact import check_not_secret
from pippo_common.config import FILE_PATH, to_dict


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100        # linear warm-up from 0 ...
    min_lr_ratio: float = 0.1      # ... then cosine decay to lr * min_lr_ratio at `steps`
    grad_clip: float = 1.0         # global gradient norm (DeepSpeed `gradient_clipping`); 0 = off
    grad_accum: int = 1            # micro-batches per optimiser step (DeepSpeed `gradient_accumulation_steps`)

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_accum < 1 or self.grad_clip < 0:
            raise ValueError("optim: lr > 0, warmup_steps >= 0, grad_accum >= 1, grad_clip >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.min_lr_ratio must lie in [0, 1]")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999          # per optimiser step, with warm-up min(decay, (1+n)/(10+n))

    def __post_init__(self):
        if not 0 <= self.decay < 1:
            raise ValueError("ema.decay must lie in [0, 1)")


@dataclass
class CheckpointConfig:
    root: str = "${PIPPO_STORE}/checkpoints"   # any fsspec URL; the run's directory is root/run_name
    every_steps: int = 500
    keep_last: int = 2             # complete step checkpoints kept (the newest is never deleted)

    def __post_init__(self):
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


@dataclass
class TrackingConfig:
    experiment: str = "pippo"
    log_every: int = 10            # steps between metric points (and progress lines)
    sample_every: int = 500        # steps between sample grids (DDIM on held-out samples); 0 = never
    sample_count: int = 2          # held-out samples in a grid
    sample_steps: int = 20         # DDIM steps of a grid
    register_model: str | None = "pippo-{stage}"   # MLflow registered model name (null = none)
    system_metrics: bool = True
    parent_run_id: str | None = None               # set by `pippo pipeline run`


@dataclass
class ResourcesConfig:
    use_gpu: bool | None = None    # null = GPUs when the Ray cluster has any
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    custom: dict[str, float] = field(default_factory=dict)   # extra Ray resources per worker
    max_failures: int = 2          # Ray Train FailureConfig: worker-group restarts, each resumes
    ray: bool = True               # false: run the per-worker loop in this process (torchrun or 1 rank)


@dataclass
class StageConfig:
    # --- SPEC §2 keys ---
    stage: Literal["pretrain", "mid", "post"]
    dataset: str                   # URI@REF of the training dataset version
    # model config YAML (size preset); in a config file, relative to that file (pippo_common.config)
    model: str = field(default="configs/models/test.yaml", metadata=FILE_PATH)
    init_from: str | None = None   # previous stage's checkpoint (run dir, its final/ dir, or a .safetensors)
    deepspeed: str = field(default="configs/deepspeed/zero2.json", metadata=FILE_PATH)
    workers: int = 1
    steps: int = 1000              # optimiser steps
    # --- ours ---
    run_name: str | None = None    # null = "{stage}-{hash of the config}" (a re-run resumes it)
    model_overrides: dict[str, Any] = field(default_factory=dict)   # e.g. {vae_path: s3://..., views: 2}
    mix: list[DataSource] = field(default_factory=list)   # more weighted sources besides `dataset`
    dataset_weight: float = 1.0
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    precision: Literal["auto", "fp32", "bf16", "autocast"] = "auto"   # auto: fp32 on CPU, bf16 on CUDA
    compile: bool = False          # engine.compile() (torch.compile of the model)
    seed: int = 0
    vae_standin_seed: int | None = None   # TESTS ONLY: a random seeded VAE instead of vae_path (logged loudly)

    def __post_init__(self):
        if self.workers < 1 or self.steps < 1:
            raise ValueError("workers and steps must be >= 1")
        if self.run_name:                  # the run's directory, checkpoint.root/run_name: one segment
            validate_name(self.run_name, "run_name")
        if "@" not in self.dataset:
            self.dataset = f"{self.dataset}@latest"
        # the run's directory, MLflow run and Ray Train run are named after it
        check_not_secret(self.run_name, "run_name")

    @property
    def sources(self) -> list[DataSource]:
        return [DataSource(self.dataset, self.dataset_weight), *self.mix]

    def resolved_run_name(self) -> str:
        """Deterministic: re-running the same command finds (and resumes) the same run. Keys that do
        not change what is trained (steps, tracking, checkpoint cadence, resources) are left out, so
        raising `steps` continues a finished run. The model and DeepSpeed configs count by content,
        not by path: their paths are absolute once resolved (pippo_common.config.resolve_file_path),
        and the same run must be found from any directory, checkout or `pippo submit` working_dir.
        (The launcher pins the name into the job: workers never read these files.)"""
        from pippo_common.config import read_json_config, read_yaml

        if self.run_name:
            return self.run_name
        d = to_dict(self)
        for key in ("steps", "tracking", "checkpoint", "resources", "run_name", "workers"):
            d.pop(key, None)
        d["model"] = read_yaml(self.model)
        d["deepspeed"] = read_json_config(self.deepspeed, "deepspeed config")
        digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.stage}-{digest}"

    def run_uri(self) -> str:
        from pippo_common.config import ConfigError, expand_env

        root = expand_env(self.checkpoint.root)      # a default is not YAML: ${PIPPO_STORE} expands here
        try:
            check_not_secret(root, "checkpoint.root")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return root.rstrip("/") + "/" + self.resolved_run_name()
