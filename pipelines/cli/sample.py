"""`pippo sample --checkpoint URI --image PATH [--views N] --out PATH`: one photo -> a turnaround
(pipelines.sample does the work)."""
from __future__ import annotations

from pipelines.cli.args import add_command


def register(top) -> None:
    p = add_command(top, "sample", sample, "one photo -> turnaround GIF/MP4",
                    "Generate a turnaround of the person in one photo (any size; cropped around the person "
                    "found, else the centre square) with a trained stage: N views on an orbit at a fixed "
                    "elevation and radius looking at the head, sampled jointly with DDIM and classifier-free "
                    "guidance (attention biasing when N exceeds the trained views). Writes --out as a GIF, an "
                    "MP4 beside it, and <out stem>_views/ (view00.png ..., cameras.json: the `pippo eval "
                    "reprojection` layout). Prints the GIF path last.\n\nexamples:\n"
                    "  pippo sample --checkpoint .pippo/store/checkpoints/post-1a2b3c4d5e --image me.jpg --out me.gif\n"
                    "  pippo sample --checkpoint s3://bucket/ckpt/post-1a2b3c4d5e/final --image photo.png "
                    "--views 48 --elevation 15 --out out/turn.gif\n"
                    "  pippo eval reprojection out/turn_views      # score the generated views")
    p.add_argument("--checkpoint", required=True, help="a training run dir, its final/, or a .safetensors URI")
    p.add_argument("--image", required=True, help="input photo (local path or fsspec URL)")
    p.add_argument("--views", type=int, default=24, help="number of views (default 24)")
    p.add_argument("--out", required=True, help="output .gif (an .mp4 and a _views/ folder go beside it)")
    p.add_argument("--elevation", type=float, default=10.0, metavar="DEG",
                   help="camera elevation above the head, degrees (default 10)")
    p.add_argument("--radius", type=float, default=2.2, metavar="M",
                   help="orbit radius, metres (default 2.2, the capture dome's)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (default 2.0; 1 = off)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="attention-biasing growth factor, used when N exceeds the trained views (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--resolution", type=int, default=None,
                   help="view side in pixels (default: the stage's training resolution)")


def sample(args) -> int:
    from pipelines.sample import SampleRequest, sample_turnaround

    out = sample_turnaround(SampleRequest(
        checkpoint=args.checkpoint, image=args.image, out=args.out, views=args.views,
        elevation=args.elevation, radius=args.radius, steps=args.steps, guidance=args.guidance,
        gamma=args.gamma, seed=args.seed, resolution=args.resolution))
    print(f"views: {out.views}")
    if out.mp4:
        print(f"mp4: {out.mp4}")
    print(out.gif)
    return 0
