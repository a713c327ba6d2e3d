"""Attention biasing, Pippo's inference result (issue #14 item 2): more views than trained, jointly.

Pippo trains on N target views and samples many more at once; joint attention over M > N views
grows the softmax's entropy with log(tokens), and attention biasing (Pippo eq. 4,
pippo_model.attention.attention_scale) rescales the logits so it stays as in training. This bench
takes the post model that `benches/learning.py` trained on N views and, on held-out frames seen
from every camera of their rig (the orbit, in azimuth order, held-out cameras included), samples
the same M in {2N, 5N} cameras three ways from the same per-view noise:

    passes of N   M/N separate passes of N views (what the model trained on: the reference)
    joint, off    all M views in one pass, plain 1/sqrt(d) attention
    joint, on     all M views in one pass, biased (gamma = --gamma, the trained growth 1.0)

and reports per-view PSNR against the ground truth (all cameras, and the held-out ones), the
reprojection error of the generated views under the true cameras (RE, % of the side; a joint
pass should be the more consistent), and the mean entropy of the attention rows (nats; biasing
should bring the joint pass's entropy back to the trained pass's).

    python benches/attention_biasing.py                       # the learning bench's post model
    python benches/attention_biasing.py --out out/bench-learning/gpu --frames 8
    python benches/attention_biasing.py --checkpoint RUN_DIR --dataset URI@REF
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pippo_model import dit  # noqa: E402  (the module whose attention call is measured)


class EntropyMeter:
    """Wraps the DiT's attention with the explicit softmax and records the mean row entropy
    H = -sum p log p over every query of every head and block (the quantity eq. 4 controls)."""

    def __init__(self):
        self.total, self.count, self._orig = 0.0, 0, dit.attention

    def __enter__(self):
        def attention(q, k, v, scale):
            p = (torch.matmul(q, k.transpose(-2, -1)) * scale).softmax(dim=-1)
            h = -(p * p.clamp_min(1e-30).log()).sum(-1)
            self.total += h.sum().item()
            self.count += h.numel()
            return torch.matmul(p, v)

        dit.attention = attention
        return self

    def __exit__(self, *exc):
        dit.attention = self._orig

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


def choose(n_cameras: int, m: int, held: np.ndarray) -> list[int]:
    """m cameras of the orbit, evenly spaced in azimuth order, starting at a held-out one."""
    start = int(np.flatnonzero(held)[0]) if held.any() else 0
    return sorted({(start + round(i * n_cameras / m)) % n_cameras for i in range(m)})


def sample(model, batch: dict, noise: torch.Tensor, per_pass: int, gamma, steps: int, guidance: float):
    """(B, M, C, h, w) views sampled `per_pass` at a time (each pass with the reference)."""
    from pippo_model.diffusion import CosineSchedule, conditions
    from pippo_model.sampler import ddim_sample

    schedule = CosineSchedule(model.cfg.timesteps)
    m = noise.shape[1]
    outs = []
    for lo in range(0, m, per_pass):
        part = {k: (v[:, lo:lo + per_pass] if v.dim() >= 2 and v.shape[1] == m else v)
                for k, v in conditions(batch).items()}
        outs.append(ddim_sample(model, schedule, part, tuple(noise[:, lo:lo + per_pass].shape), steps=steps,
                                eta=0.0, guidance=guidance, gamma=gamma, clip=1.0,
                                noise=noise[:, lo:lo + per_pass].clone()))
    return torch.cat(outs, dim=1).clamp(-1, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.strip().splitlines()[-3:]))
    p.add_argument("--out", default="out/bench-learning/cpu", help="the learning bench's output directory")
    p.add_argument("--checkpoint", help="a post run directory (default: the learning bench's post)")
    p.add_argument("--dataset", help="its dataset URI@REF (default: the learning bench's)")
    p.add_argument("--frames", type=int, default=2, help="held-out frames to sample")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--multiples", default="2,5", help="M = k x N for each k")
    args = p.parse_args()
    torch.manual_seed(0)

    from dataprep.loader import DataSource, LoaderConfig, TrainingLoader
    from pipelines.evaluation import reprojection
    from pipelines.training.engine import to_model_space
    from pipelines.weights import load_autoencoder, load_final_model, run_config
    from pippo_model.metrics.image import psnr

    runs = json.loads((ROOT / args.out / "runs.json").read_text()) if not (args.checkpoint and args.dataset) else {}
    checkpoint = args.checkpoint or runs["post"]
    dataset = args.dataset or runs["dataset"]
    model, cfg = load_final_model(checkpoint)
    trained = run_config(checkpoint)["data"]
    n, side = int(trained["views"]), int(trained["resolution"])
    data = LoaderConfig(batch_size=1, num_workers=0, resolution=side, views=16, augment=False,
                        holdout_fraction=float(trained["holdout_fraction"]),
                        holdout_cameras=float(trained["holdout_cameras"]), seed=0)
    pixel = TrainingLoader([DataSource(dataset)], "post", data).heldout_batch(args.frames, targets="orbit")
    cams = pixel["views"].shape[1]
    held = pixel["_heldout_camera"][0].bool().numpy()
    print(f"post model trained on N={n} views at {side} px; {args.frames} held-out frames x {cams} orbit cameras "
          f"({int(held.sum())} held out)", file=sys.stderr)
    rows = []
    for k in (int(x) for x in args.multiples.split(",")):
        m = min(k * n, cams)
        idx = choose(cams, m, held)
        sub = {key: (v[:, idx] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == cams else v)
               for key, v in pixel.items()}
        batch = to_model_space({key: v for key, v in sub.items() if torch.is_tensor(v)}, load_autoencoder(cfg, 'cpu'),
                               torch.device("cpu"), torch.float32)
        noise = torch.randn(batch["views"].shape, generator=torch.Generator().manual_seed(k))
        gt = sub["views"].float()
        is_held = torch.from_numpy(held[idx])
        for label, per_pass, gamma in ((f"passes of N={n}", n, None), ("joint, biasing off", m, None),
                                       (f"joint, biasing on (gamma {args.gamma:g})", m, args.gamma)):
            with EntropyMeter() as meter:
                x = sample(model, batch, noise, per_pass, gamma, args.steps, args.guidance)
            per_view = torch.stack([psnr(x[s], gt[s]) for s in range(x.shape[0])])      # (B, M)
            upscale = 2 if side < 128 else 1
            errors = reprojection(x, sub, upscale)
            re = 100.0 * float(np.mean(list(errors.values()))) / side if errors else math.nan
            rows.append({"M": m, "how": label, "psnr": per_view.mean().item(),
                         "psnr_heldout": per_view[:, is_held].mean().item() if is_held.any() else math.nan,
                         "re_pct": re, "re_pairs": len(errors), "entropy": meter.mean,
                         "max_entropy": math.log((per_pass + 1) * (side // cfg.patch_size) ** 2)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n| M views | how | PSNR all | PSNR held-out cams | RE % (pairs) | attention entropy (nats; log N_tokens) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        re = "-" if math.isnan(r["re_pct"]) else f"{r['re_pct']:.3f}"
        print(f"| {r['M']} | {r['how']} | {r['psnr']:.2f} | {r['psnr_heldout']:.2f} | {re} ({r['re_pairs']}) | "
              f"{r['entropy']:.3f} ({r['max_entropy']:.2f}) |")
    (ROOT / args.out).mkdir(parents=True, exist_ok=True)
    (ROOT / args.out / "attention_biasing.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
