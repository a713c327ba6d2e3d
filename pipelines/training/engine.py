"""What the per-worker loop is built from: the distributed context, the DeepSpeed config and engine,
the diffusion objective, the frozen autoencoder, the LR schedule and the sample grid.

Nothing here imports Ray: the loop runs under Ray Train, under torchrun, or alone in one process.
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pippo_model.diffusion import CosineSchedule, training_loss

log = logging.getLogger("pippo.train")


# -- distributed context -------------------------------------------------------------------------------

@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(use_ray: bool) -> DistContext:
    """Rank, world and device from Ray Train (which has already created the process group), from
    torchrun's variables, or a single process; then DeepSpeed's communication on the same group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # no "unable to detect" warning on CPU hosts
    import deepspeed

    if use_ray:
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    else:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # DeepSpeed reads these; Ray Train does not set them
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)})
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if world == 1 and not use_ray and "TORCHELASTIC_RUN_ID" not in os.environ:
            # a lone rank (not torchrun's) needs no rendezvous: an in-memory store, no socket. A
            # "free" port picked here could be taken by another process (a Ray worker, a parallel
            # run) before the TCPStore binds it — EADDRINUSE seen in CI
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend=backend)
    return DistContext(rank, world, local_rank, device)


# -- DeepSpeed ----------------------------------------------------------------------------------------

def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(base: dict, *, micro_batch: int, grad_accum: int, grad_clip: float,
                     precision: str, universal: bool) -> dict:
    """The stage's DeepSpeed config: the file's ZeRO settings plus what the stage config owns
    (batch, accumulation, clipping, precision) — one source of truth for each value."""
    cfg = {k: v for k, v in copy.deepcopy(base).items() if not k.startswith("_")}
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
               gradient_clipping=grad_clip)
    cfg.pop("train_batch_size", None)          # DeepSpeed derives it from the two above and the world
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.pop("bf16", None), cfg.pop("fp16", None), cfg.pop("torch_autocast", None)
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "autocast":              # fp32 master params, bf16 matmuls (torch.autocast)
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    zero = cfg.get("zero_optimization", {})
    if not torch.cuda.is_available():
        # CPU (gloo): no CUDA streams to overlap communication on, and copying every gradient into a
        # contiguous buffer costs ~8 % of a step here (benches/training.py); both pay off on GPUs
        if zero.get("stage", 0) in (1, 2):
            zero["overlap_comm"] = False
            zero["contiguous_gradients"] = False
        if zero.get("offload_optimizer", {}).get("device") == "cpu":
            zero["offload_optimizer"]["pin_memory"] = False   # no pinned memory without CUDA
    return cfg


class DiffusionObjective(nn.Module):
    """The module DeepSpeed wraps: forward(batch) -> the diffusion loss (Ho et al. eq. 14, see
    pippo_model.diffusion.training_loss). Wrapping the loss, not just the network, lets
    engine.compile() fuse the noising and the loss with the model."""

    def __init__(self, model: nn.Module, schedule: CosineSchedule):
        super().__init__()
        self.model = model
        self.schedule = schedule

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return training_loss(self.model, self.schedule, batch, generator)


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then half a cosine down to base * min_ratio at `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and CFG dropout of a micro-batch are a function of (seed, step, micro, rank):
    a resumed run draws exactly what the uninterrupted run would have, with no RNG state to save."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 1009 + micro * 101 + rank) % (2 ** 63))
    return g


IMAGE_KEYS = ("views", "reference", "anchor")   # pixel images of the loader -> model space
TENSOR_KEYS = ("cameras", "plucker", "view_ids")


@torch.no_grad()
def camera_inputs(batch: dict) -> torch.Tensor | None:
    """The camera MLP's vectors (B, V, 16) float32 of a batch's target cameras "_R", "_t", unless
    the batch already carries "cameras". The one place camera vectors are made from a loader-style
    batch (training, evaluation and sampling all pass through `to_model_space`): the data side
    delivers the SPEC quantities only. Computed on the CPU in float64, as the loader used to, so
    the vectors are bit-identical to those it delivered."""
    if "cameras" in batch or "_R" not in batch or "_t" not in batch:
        return None
    from pippo_model.conditioning import camera_vectors

    R = torch.as_tensor(batch["_R"]).detach().to("cpu", torch.float64)
    t = torch.as_tensor(batch["_t"]).detach().to("cpu", torch.float64)
    return camera_vectors(R, t).float()


def to_model_space(batch: dict, autoencoder, device: torch.device, dtype: torch.dtype) -> dict:
    """Loader batch (pixels in [-1, 1], dataprep.loader) -> the `cond`/`views` contract of
    pippo_model (latents x scaling factor, or pixels in pixel space), on `device`. The target
    cameras "_R", "_t" become the camera vectors here (`camera_inputs`)."""
    out = {}
    cameras = camera_inputs(batch)
    if cameras is not None:
        batch = {**batch, "cameras": cameras}
    for key in IMAGE_KEYS:
        if key not in batch:
            continue
        x = batch[key].to(device, non_blocking=True)
        lead = x.shape[:-3]
        z = autoencoder.encode(x.reshape(-1, *x.shape[-3:]).float())
        out[key] = z.reshape(*lead, *z.shape[-3:]).to(dtype)
    for key in TENSOR_KEYS:
        if key in batch:
            x = batch[key].to(device, non_blocking=True)
            out[key] = x if key == "view_ids" else x.to(dtype)
    return out


# -- sample grids ------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(model, schedule, autoencoder, pixel_batch: dict, model_batch: dict, steps: int,
                seed: int) -> tuple[bytes, torch.Tensor]:
    """DDIM samples of held-out samples as one PNG: per row the reference, the ground-truth views
    and the sampled views. Collective under ZeRO-3 (every rank runs the same forward passes).
    Returns (png bytes, sampled views in pixels (B, V, 3, H, W))."""
    from PIL import Image

    from pippo_model.diffusion import conditions
    from pippo_model.sampler import ddim_sample

    was_training = model.training
    model.eval()
    views = model_batch["views"]
    g = torch.Generator(device=views.device).manual_seed(seed)
    x = ddim_sample(model, schedule, conditions(model_batch), tuple(views.shape), steps=steps, eta=0.0,
                    clip=1.0 if model.cfg.space == "pixel" else None, generator=g)
    model.train(was_training)
    b, v = x.shape[:2]
    pixels = autoencoder.decode(x.reshape(b * v, *x.shape[2:]).float()).clamp(-1, 1)
    pixels = pixels.reshape(b, v, *pixels.shape[1:]).cpu()
    ref, gt = pixel_batch["reference"].cpu(), pixel_batch["views"].cpu()
    rows = [torch.cat([ref[i], *gt[i], *pixels[i]], dim=-1) for i in range(b)]
    grid = ((torch.cat(rows, dim=-2) + 1) * 127.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue(), pixels
