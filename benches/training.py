"""What the trainer costs on CPU, as ratios measured in one run (the machine is noisy).

1. Step time of the trainer's DeepSpeed ZeRO-2 engine on 1 rank (pipelines.training: the
   DiffusionObjective under deepspeed.initialize, torch AdamW, fp32, gloo) ÷ a plain torch AdamW
   loop on the same model and batch (goal <= 1.10). Measured alternately, best of N each.
2. ZeRO-3 model-state bytes per rank on 2 ranks (parameter partitions, gradient partitions, fp32
   master partitions, Adam moments) vs 16Ψ/N, the ZeRO paper's mixed-precision count (goal within
   15 %); fp32 training on CPU keeps 4-byte parameters and gradients, so 20Ψ/N is shown too.
3. MLflow logging time on the caller's side (RunTracker.log_metrics, sqlite store) ÷ step time
   (goal <= 0.01).
Usage: python benches/training.py [--steps 6] [--batch 4]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def model_and_batch(batch: int, stage: str = "post"):
    from pippo_model import config as C
    from pippo_model.diffusion import CosineSchedule
    from pippo_model.model import build_model
    from pipelines.training.engine import DiffusionObjective

    torch.manual_seed(0)
    cfg = C.test(resolution=128, views=4).for_stage(stage)
    h = cfg.latent_size
    data = {"views": torch.randn(batch, 4, 4, h, h), "reference": torch.randn(batch, 4, h, h),
            "cameras": torch.randn(batch, 4, 16), "plucker": torch.randn(batch, 4, 6, 4, 4),
            "anchor": torch.randn(batch, 4, 4, h, h)}
    return DiffusionObjective(build_model(cfg), CosineSchedule()), data


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def zero2_vs_plain(steps: int, batch: int) -> dict:
    import deepspeed

    from pipelines.training.engine import deepspeed_config, setup_distributed, step_generator

    setup_distributed(use_ray=False)
    plain, data = model_and_batch(batch)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    ds_model, _ = model_and_batch(batch)
    ds_opt = torch.optim.AdamW(ds_model.parameters(), lr=1e-4)
    base = json.load(open(os.path.join(ROOT, "configs/deepspeed/zero2.json")))
    engine, _, _, _ = deepspeed.initialize(model=ds_model, optimizer=ds_opt, config=deepspeed_config(
        base, micro_batch=batch, grad_accum=1, grad_clip=1.0, precision="fp32", universal=False))
    cpu = torch.device("cpu")

    def plain_step(i=[0]):
        opt.zero_grad(set_to_none=True)
        plain(data, step_generator(0, i[0], 0, 0, cpu)).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        i[0] += 1

    def engine_step(i=[0]):
        loss = engine(data, step_generator(0, i[0], 0, 0, cpu))
        engine.backward(loss)
        engine.step()
        i[0] += 1

    plain_step(), engine_step()                      # warm-up
    t_plain, t_ds = [], []
    for _ in range(steps):
        t_plain.append(timed(plain_step))
        t_ds.append(timed(engine_step))
    return {"plain_s": min(t_plain), "zero2_s": min(t_ds), "ratio": min(t_ds) / min(t_plain)}


def zero3_bytes_rank() -> None:
    """Runs as one of 2 ranks: prints this rank's model-state bytes as JSON."""
    import deepspeed

    from pipelines.training.engine import deepspeed_config, setup_distributed

    ctx = setup_distributed(use_ray=False)
    model, data = model_and_batch(2)
    psi = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base = json.load(open(os.path.join(ROOT, "configs/deepspeed/zero3.json")))
    base["zero_optimization"]["stage3_param_persistence_threshold"] = 0   # partition every tensor
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(
        base, micro_batch=2, grad_accum=1, grad_clip=1.0, precision=os.environ.get("BENCH_PRECISION", "bf16"),
        universal=False))
    dtype = torch.bfloat16 if os.environ.get("BENCH_PRECISION", "bf16") == "bf16" else torch.float32
    loss = engine({k: v.to(dtype) for k, v in data.items()})
    engine.backward(loss)
    engine.step()
    zo = engine.optimizer
    params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    master = sum(t.numel() * t.element_size() for t in zo.fp32_partitioned_groups_flat)
    buf = zo.grad_partitions_flat_buffer            # this rank's gradient partitions, one flat buffer
    grads = buf.numel() * buf.element_size()
    moments = sum(v.numel() * v.element_size() for st in zo.optimizer.state.values() for k, v in st.items()
                  if torch.is_tensor(v) and v.numel() > 1)
    print(json.dumps({"rank": ctx.rank, "psi": psi, "params": params, "master": master, "grads": grads,
                      "moments": moments}), flush=True)


def zero3_bytes() -> dict:
    port = str(29600 + os.getpid() % 300)
    procs = [subprocess.Popen([sys.executable, __file__, "--zero3-rank"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    out = [json.loads([ln for ln in p.communicate()[0].splitlines() if ln.startswith("{")][-1]) for p in procs]
    psi = out[0]["psi"]
    total = [o["params"] + o["master"] + o["grads"] + o["moments"] for o in out]
    return {"psi": psi, "per_rank": total, "detail": out, "16psi_over_n": 16 * psi / 2, "20psi_over_n": 20 * psi / 2,
            "ratio_16": max(total) / (16 * psi / 2), "ratio_20": max(total) / (20 * psi / 2)}


def mlflow_cost(step_s: float, calls: int = 200) -> dict:
    from pipelines.tracking import RunTracker

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/m.db"
        tracker = RunTracker("bench", step_tag="pretrain", system_metrics=False)
        start = time.perf_counter()
        for i in range(calls):
            tracker.log_metrics({"train/loss": 1.0 / (i + 1), "train/lr": 1e-4, "train/samples_per_s": 10.0,
                                 "train/grad_norm": 0.5}, i)
        per_call = (time.perf_counter() - start) / calls
        tracker.end()
    return {"log_metrics_s": per_call, "ratio": per_call / step_s}


def main():
    if "--zero3-rank" in sys.argv:
        return zero3_bytes_rank()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    r = zero2_vs_plain(args.steps, args.batch)
    print(f"1. ZeRO-2 engine step {r['zero2_s'] * 1e3:.0f} ms vs plain torch AdamW {r['plain_s'] * 1e3:.0f} ms "
          f"(test preset, 128 px, 4 views, batch {args.batch}, 1 rank, fp32): ratio {r['ratio']:.3f} (goal <= 1.10)")
    z = zero3_bytes()
    print(f"2. ZeRO-3 model states per rank (N=2, Ψ={z['psi']:,}): {max(z['per_rank']):,} B; "
          f"16Ψ/N = {z['16psi_over_n']:,.0f} B (ratio {z['ratio_16']:.3f}); fp32 20Ψ/N ratio {z['ratio_20']:.3f}; "
          f"detail rank 0: {z['detail'][0]}")
    m = mlflow_cost(r["zero2_s"])
    print(f"3. MLflow log_metrics {m['log_metrics_s'] * 1e6:.0f} µs per step call vs step {r['zero2_s'] * 1e3:.0f} ms: "
          f"ratio {m['ratio']:.5f} (goal <= 0.01)")


if __name__ == "__main__":
    main()
