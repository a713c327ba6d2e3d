"""CPU model FLOPs utilisation (MFU) of a training step, and fused SDPA vs naive attention.

MFU = model FLOPs/s (pippo_model.flops.training_flops_per_sample x samples / step time) divided
by the peak of a large fp32 torch matmul measured in the same run (the best any kernel here can
do). Plücker maps come at the dataset layout's grid (resolution / plucker_stride, default 16 as
in dataprep's build config); --plucker-stride 1 feeds pixel-resolution maps, where the ControlMLP's
per-pixel SIREN (elementwise sines, almost no FLOPs) dominates small models. Attention: torch's fused scaled_dot_product_attention against the explicit softmax(QK^T)V,
same shapes (one test/tiny training sequence: 5 views x 64 tokens, and 5x more views), forward +
backward. Usage: python benches/model.py [--presets test tiny] [--steps 3]
"""
import argparse
import time

import torch

from pippo_model import config as C
from pippo_model.attention import attention, naive_attention
from pippo_model.diffusion import CosineSchedule, training_loss
from pippo_model.flops import forward_flops
from pippo_model.model import build_model

BATCH = {"test": 16, "tiny": 2, "full": 1}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / best_time(lambda: a @ b, repeats)


def batch_for(cfg, b, plucker_stride):
    h, c, v = cfg.latent_size, cfg.latent_channels, cfg.views
    p = cfg.resolution // plucker_stride
    return {"views": torch.randn(b, v, c, h, h), "reference": torch.randn(b, c, h, h),
            "cameras": torch.randn(b, v, 16), "plucker": torch.randn(b, v, 6, p, p),
            "anchor": torch.randn(b, v, c, h, h)}


def train_step_and_peak(cfg, b: int, rounds: int, plucker_stride: int, compile: bool = False) -> tuple[float, float]:
    """Best training-step time and best matmul peak, measured in alternation so a noisy neighbour
    on the machine affects both the same way (the best of each is its uncontended value).
    `compile`: torch.compile (inductor) fuses the per-token elementwise work (adaLN modulation,
    LayerNorm, GELU) that dominates small models on CPU; the first step pays the compilation."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    schedule, batch = CosineSchedule(), batch_for(cfg, b, plucker_stride)
    forward = torch.compile(model) if compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        training_loss(forward, schedule, batch).backward()
        opt.step()

    step()
    times, peaks = [], []
    for _ in range(rounds):
        peaks.append(matmul_peak(repeats=3))
        times.append(best_time(step, 1))
    return min(times), max(peaks)


def attention_times(b, heads, n, d, repeats):
    q, k, v = (torch.randn(b, heads, n, d, requires_grad=True) for _ in range(3))
    scale = d ** -0.5

    def once(fn):
        start = time.perf_counter()
        fn(q, k, v, scale).sum().backward()
        return time.perf_counter() - start

    once(attention), once(naive_attention)  # warm-up
    fused, naive = [], []
    for _ in range(repeats):  # alternate, so load from elsewhere hits both alike; keep the best
        fused.append(once(attention))
        naive.append(once(naive_attention))
    return min(fused), min(naive)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["test", "tiny"], choices=list(C.PRESETS))
    parser.add_argument("--steps", type=int, default=4, help="timed rounds of (matmul peak, training step); best kept")
    parser.add_argument("--plucker-stride", type=int, default=16, help="Plücker grid = 128 / stride (default 16)")
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile (~1 min compile per preset)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.presets:
        cfg = C.PRESETS[name](resolution=128, views=4, grad_checkpointing=False)
        b = BATCH[name]
        p = cfg.resolution // args.plucker_stride
        flops = 3.0 * forward_flops(cfg, plucker_hw=(p, p)) * b  # forward + backward ~ 3x forward
        for compiled in (False, True) if args.compile else (False,):
            dt, peak = train_step_and_peak(cfg, b, args.steps, args.plucker_stride, compiled)
            print(f"{name:>5}{' compiled' if compiled else ''}: batch {b}, 128 px, 4 views, Plücker {p}x{p}: "
                  f"step {dt:.3f} s, {flops / dt / 1e9:.1f} GFLOP/s, peak {peak / 1e9:.1f} GFLOP/s, "
                  f"MFU {flops / dt / peak:.2f}")
    for views, heads, d in ((4, 12, 64), (20, 12, 64)):
        n = (views + 1) * 64
        fused, naive = attention_times(1, heads, n, d, 4 * args.steps)
        print(f"attention fwd+bwd, {heads} heads x {n} tokens x d {d}: fused {fused * 1e3:.1f} ms, "
              f"naive {naive * 1e3:.1f} ms, speed-up {naive / fused:.2f}x")


if __name__ == "__main__":
    main()
