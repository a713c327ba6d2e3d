"""GPU: MFU of the trainer's own step vs plain torch, on one GPU (issue: ZeRO-2 >= 0.40 MFU).

Runs the Ray-free pieces of pipelines.training (DiffusionObjective under deepspeed.initialize with
the trainer's DeepSpeed config, the trainer's precision modes, engine.compile()) against a plain
torch loop (fp32 master weights + torch.autocast bf16 + fused AdamW), same model, batch and data.
Needs only torch + deepspeed (+ pydantic) on the host. MFU = training FLOPs per sample
(pippo_model.flops) x samples / step time / peak (--peak, default H100 SXM dense bf16 989 TFLOP/s).

Usage: python benches/gpu_training.py [--preset full] [--resolution 512] [--views 4] [--batch 4]
           [--checkpointing] [--variants plain plain_compiled zero2_bf16 zero2_bf16_compiled
           zero2_autocast_compiled] [--steps 10]
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(args):
    from pippo_model import config as C
    from pippo_model.diffusion import CosineSchedule
    from pippo_model.model import build_model
    from pipelines.training.engine import DiffusionObjective

    cfg = C.PRESETS[args.preset](resolution=args.resolution, views=args.views,
                                 grad_checkpointing=args.checkpointing).for_stage("post")
    torch.manual_seed(0)
    h, b, v, c = cfg.latent_size, args.batch, args.views, cfg.latent_channels
    dev = torch.device("cuda")
    data = {"views": torch.randn(b, v, c, h, h, device=dev), "reference": torch.randn(b, c, h, h, device=dev),
            "cameras": torch.randn(b, v, 16, device=dev), "plucker": torch.randn(b, v, 6, h // 4, h // 4, device=dev),
            "anchor": torch.randn(b, v, c, h, h, device=dev)}
    return cfg, DiffusionObjective(build_model(cfg), CosineSchedule()).to(dev), data


def plain_step_fn(model, data, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def engine_step_fn(model, data, precision: str, compiled: bool, batch: int):
    import deepspeed

    from pipelines.training.engine import deepspeed_config

    base = json.load(open(os.path.join(ROOT, "configs/deepspeed/zero2.json")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(
        base, micro_batch=batch, grad_accum=1, grad_clip=1.0, precision=precision, universal=False))
    if compiled:
        engine.compile()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch_data = {k: v.to(dtype) for k, v in data.items()}

    def step():
        loss = engine(batch_data)
        engine.backward(loss)
        engine.step()
    return step


def timed(step, steps: int) -> float:
    for _ in range(3):
        step()                      # warm-up / compilation
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak", type=float, default=989e12)
    p.add_argument("--variants", nargs="+", default=["plain", "plain_compiled", "zero2_bf16",
                                                     "zero2_bf16_compiled", "zero2_autocast_compiled"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_training: no CUDA device here, skipped (run it on a GPU host)")
        return
    from pipelines.training.engine import setup_distributed
    from pippo_model.flops import training_flops_per_sample

    setup_distributed(use_ray=False)
    torch.backends.cuda.matmul.allow_tf32 = True
    for variant in args.variants:
        cfg, model, data = build(args)
        flops = training_flops_per_sample(cfg) * args.batch
        if variant.startswith("plain"):
            step = plain_step_fn(model, data, variant.endswith("compiled"))
        else:
            precision = "autocast" if "autocast" in variant else "bf16"
            step = engine_step_fn(model, data, precision, variant.endswith("compiled"), args.batch)
        dt = timed(step, args.steps)
        print(f"{variant:>26}: {args.preset} {args.resolution}px {args.views} views batch {args.batch}"
              f"{' ckpt' if args.checkpointing else ''}: {dt * 1e3:.0f} ms/step, MFU {flops / dt / args.peak:.3f}, "
              f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        del model, step
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
