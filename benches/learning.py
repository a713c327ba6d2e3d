"""Do the stages learn their jobs? Novel views of a synthetic studio subject, measured (issue #14).

The bench drives the REAL path: one workflow (`pippo pipeline run`, configs written under --out)
synth -> dataprep (the Ray build) -> pretrain -> mid -> post (`pippo train` each: Ray Train +
DeepSpeed, checkpoints, stage handoff, MLflow) -> eval of mid and post (pipelines.evaluation:
the stage's own DDIM sampler at HELD-OUT CAMERAS, never seen in training at any frame, of held-out
frames and of seen frames, plus the wrong-camera control), then reads the numbers back from MLflow
(`pippo compare --json`, the stages' evals side by side) and prints the tables of
benches/RESULTS.md, with each stage's train/loss curve.

The studio set (dataprep.studio.synth): the procedural textured figure (one subject; its head turns and
nods from frame to frame), `captures` rigs of `cameras` cameras on a dome (golden-angle azimuths,
elevations -10..40°, each capture its own rig: more distinct viewpoints), `frames` frames each.
Held out: `holdout_fraction` of the frames (by capture + frame) and `holdout_cameras` of every
rig's cameras (in neighbouring pairs, so the reprojection error has pairs to measure).

    python benches/learning.py                      # CPU scale (2 cores: see benches/RESULTS.md)
    python benches/learning.py --scale gpu          # the same bench larger; GPUs found by Ray
    python benches/learning.py --mid-steps 300 ...  # any knob of the scale

Re-running reuses every finished step (the workflow cache): only changed stages train again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each scale trains. cpu: 2 shared cores, ~35 minutes under load; gpu: one node of GPUs.
SCALES = {
    "cpu": dict(captures=3, cameras=16, frames=6, height=192, width=128, photos=48, resolution=64,
                patch=4, pretrain_res=64, pretrain_steps=200, mid_steps=1200, post_steps=400, workers=2,
                batch=2, views=2, eval_samples=8, eval_views=2, eval_steps=20, model="configs/models/test.yaml",
                prediction="v", lr=1e-3, guidance=2.0),
    "gpu": dict(captures=32, cameras=32, frames=16, height=768, width=512, photos=2000, resolution=256,
                patch=8, pretrain_res=128, pretrain_steps=5000, mid_steps=20000, post_steps=10000, workers=0,
                batch=8, views=4, eval_samples=32, eval_views=4, eval_steps=50, model="configs/models/test.yaml",
                prediction="v", lr=5e-4, guidance=2.0),
}


def workflow(s: dict, name: str) -> dict:
    """The workflow config of a scale: every stage in pixel space with one model geometry."""
    # v-prediction (Salimans & Ho 2022): with eps-prediction a small pixel-space model's x0 estimate
    # at high noise is eps error x 1/sqrt(alpha_bar) and 20-step DDIM samples stayed saturated noise
    # (PSNR 6.6 dB at 128 px, 11.4 dB at 64 px after 250 steps, vs 17.5 dB with v at the same step)
    geometry = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": s["patch"],
                "resolution": s["resolution"], "prediction": s["prediction"]}
    workers = s["workers"] or _gpus() or 1
    data = {"batch_size": s["batch"], "num_workers": 1, "holdout_fraction": 0.25, "holdout_cameras": 0.25}
    common = {"dataset": "${steps.dataprep}", "model": str(ROOT / s["model"]), "model_overrides": geometry, "workers": workers,
              "tracking.sample_every": 0, "tracking.log_every": 10, "tracking.register_model": None,
              "optim.lr": s["lr"], "ema.decay": 0.995}
    stage = {
        "pretrain": {**common, "steps": s["pretrain_steps"],
                     "data": {**data, "resolution": s["pretrain_res"], "views": 1, "batch_size": 4 * s["batch"]}},
        "mid": {**common, "init_from": "${steps.pretrain}", "steps": s["mid_steps"],
                "data": {**data, "resolution": s["resolution"], "views": s["views"]}},
        "post": {**common, "init_from": "${steps.mid}", "steps": s["post_steps"],
                 "data": {**data, "resolution": s["resolution"], "views": s["views"], "face_views": 0}},
    }
    evals = {f"eval_{k}": {"kind": "eval", "overrides": {
        "checkpoint": f"${{steps.{k}}}", "dataset": "${steps.dataprep}", "holdout_fraction": 0.25,
        "holdout_cameras": 0.25, "samples": s["eval_samples"], "views": s["eval_views"],
        "resolution": s["resolution"], "steps": s["eval_steps"], "guidance": s["guidance"], "run_name": f"eval-{k}"}}
        for k in ("mid", "post")}
    return {"name": name, "experiment": name, "steps": {
        "data": {"kind": "synth", "params": {k: s[k] for k in ("captures", "cameras", "frames", "height", "width",
                                                               "photos")} | {"seed": 7}},
        "dataprep": {"kind": "dataprep", "config": str(ROOT / "configs/datasets/demo.yaml"), "overrides": {
            "sources": [{"kind": "captures", "uri": "${steps.data.captures}"},
                        {"kind": "images", "uri": "${steps.data.photos}"}],
            "resolution": s["resolution"], "plucker_stride": 16, "face_crop": False, "tags": []}},
        **{k: {"kind": "train", "config": str(ROOT / f"configs/stages/{k}.yaml"), "overrides": _nested(v)} for k, v in stage.items()},
        **evals}}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def pippo(args: list[str], env: dict, log: Path) -> str:
    """Run `pippo ARGS` (the CLI module: the same code as the console script); stdout returned,
    stderr (progress) appended to `log`."""
    with open(log, "a") as err:
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=err)
    if out.returncode:
        sys.exit(f"pippo {' '.join(args[:2])} failed (exit {out.returncode}); see {log}")
    return out.stdout


def pippo_python(code: str, argv: list[str], env: dict, log: Path) -> str:
    """Run a snippet of the pipeline's Python API (the last stdout line returned)."""
    with open(log, "a") as err:
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=err)
    if out.returncode:
        sys.exit(f"bench snippet failed (exit {out.returncode}); see {log}")
    return out.stdout.strip().splitlines()[-1]


def loss_curves(tracking_uri: str, runs: list[dict], points: int = 8) -> dict[str, list[tuple[int, float]]]:
    """stage -> train/loss at `points` evenly spaced steps (means over windows: the loss of one
    diffusion step is noisy), from the stage runs of the newest pipeline run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    out = {}
    for r in runs:
        if r["step"] in ("pretrain", "mid", "post") and "train/loss" in r["metrics"]:
            hist = sorted((m.step, m.value) for m in client.get_metric_history(r["run_id"], "train/loss"))
            if not hist:
                continue
            k = max(1, len(hist) // points)
            out[r["step"]] = [(hist[min(i + k, len(hist)) - 1][0], sum(v for _, v in hist[i:i + k]) / len(hist[i:i + k]))
                              for i in range(0, len(hist), k)]
    return out


def _f(v, digits=2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(evals: dict, curves: dict, scale: str, command: str, seconds: dict) -> str:
    lines = [f"### `{command}` ({scale})", ""]
    lines += ["| stage | PSNR held-out cams, seen frames | PSNR held-out cams, held-out frames | "
              "PSNR wrong camera (90°) | SSIM | RE gen % (pairs) | RE GT % (pairs) | RE gen / GT, same pairs |",
              "|---|---|---|---|---|---|---|---|"]
    for stage, m in evals.items():
        same = m.get("eval/re_pct_same_pairs"), m.get("eval/re_pct_gt_same_pairs")
        ratio = same[0] / same[1] if None not in same and not any(map(math.isnan, same)) and same[1] else None
        lines.append(f"| {stage} | {_f(m.get('eval/psnr_seen'))} | {_f(m.get('eval/psnr'))} | "
                     f"{_f(m.get('eval/psnr_wrong_camera'))} | {_f(m.get('eval/ssim'), 3)} | "
                     f"{_f(m.get('eval/re_pct'), 3)} ({_f(m.get('eval/re_pairs'), 0)}) | "
                     f"{_f(m.get('eval/re_pct_gt'), 3)} ({_f(m.get('eval/re_pairs_gt'), 0)}) | {_f(ratio)} |")
    strip = (evals.get("post") or {}).get("strip")
    if strip:
        lines += ["", f"post turnaround of held-out frame {strip['key']} at all {strip['views']} cameras "
                      f"({strip['path']}): PSNR {strip['psnr']:.2f} dB, {strip['psnr_heldout_cameras']:.2f} dB "
                      f"at the held-out cameras"]
    lines += ["", "train/loss (window means) by step:", ""]
    for stage, pts in curves.items():
        lines.append(f"- {stage}: " + ", ".join(f"{s}: {v:.3f}" for s, v in pts))
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())]
    return "\n".join(lines)


def re_floor(resolutions=(64, 96, 128, 160), cameras: int = 16) -> str:
    """How reliably the reprojection error measures GROUND-TRUTH views per resolution: rendered
    views of one frame on the bench's dome, the pairs `pair_views` proposes, how many the default
    matcher measures natively and at 2x upscale (pipelines.evaluation's match_upscale_below), and
    the noise floor. The eval resolution is the smallest where most pairs are measured."""
    from dataprep.studio.synth import render_views
    from pippo_model.metrics.reprojection import (UpscaledMatcher, WideBaselineMatcher, pair_views,
                                                  reprojection_error)

    lines = ["| side px | pairs proposed | measured (native) | RE GT % (native) | measured (2x) | RE GT % (2x) |",
             "|---|---|---|---|---|---|"]
    for res in resolutions:
        views = render_views(cameras, res, res, seed=0, frame=0)
        cams = [{k: v[k] for k in "KRt"} for v in views]
        cells = [str(res), str(len(pair_views(cams)))]
        for matcher in (WideBaselineMatcher(), UpscaledMatcher(WideBaselineMatcher(), 2)):
            try:
                r = reprojection_error([v["image"] for v in views], cams, matcher)
                cells += [str(r.pairs), f"{r.re_pct:.3f}"]
            except ValueError:
                cells += ["0", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--out", default="out/bench-learning")
    ap.add_argument("--no-strip", action="store_true", help="skip the post model's held-out turnaround strip")
    ap.add_argument("--re-floor", action="store_true", help="only measure the RE's ground-truth floor per resolution")
    for key, value in SCALES["cpu"].items():
        if isinstance(value, (int, float)) and key != "model":
            ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    ap.add_argument("--prediction", choices=("eps", "v"), default=None)
    args = ap.parse_args()
    if args.re_floor:
        print(re_floor())
        return 0
    s = dict(SCALES[args.scale])
    s.update({k: v for k, v in vars(args).items() if k in s and v is not None})
    out = (ROOT / args.out / args.scale).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = f"learning-{args.scale}"
    config = out / "learning.yaml"
    config.write_text(json.dumps(workflow(s, name), indent=1))      # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPPO_STORE": str(out / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    log = out / "progress.log"
    print(f"bench: {args.scale} scale, workflow {config}, progress in {log}", file=sys.stderr)
    start = time.perf_counter()
    lines = pippo(["pipeline", "run", str(config)], env, log).strip().splitlines()
    seconds = {"workflow": time.perf_counter() - start}
    for line in lines[:-1]:                        # "step  ran 12.3 s  output" per step
        parts = line.split()
        if len(parts) > 3 and parts[1] == "ran":
            seconds[parts[0]] = float(parts[2])
    outputs = {ln.split()[0]: ln.split()[-1] for ln in lines[:-1] if len(ln.split()) > 3}
    (out / "runs.json").write_text(json.dumps({"dataset": outputs.get("dataprep"), "mid": outputs.get("mid"),
                                              "post": outputs.get("post")}, indent=1))
    doc = json.loads(pippo(["compare", "--experiment", name, "--out", str(out / "compare"), "--json"], env, log))
    parent = next(r for r in doc["runs"] if r["step"] == "pipeline" and r["depth"] == 0 and r["run_id"] == lines[-1])
    mine = [r for r in doc["runs"] if r["parent_run_id"] == parent["run_id"]]
    evals = {r["eval_stage"]: r["eval_metrics"] for r in mine if r.get("eval_stage")}
    # a cached step's child run carries no metrics: fall back to the newest eval of that stage
    evals = {k: evals.get(k) or doc["stage_evals"].get(k, {}) for k in ("mid", "post")}
    curves = loss_curves(env["MLFLOW_TRACKING_URI"], [r for r in doc["runs"] if r["step"] in ("pretrain", "mid", "post")])
    if not args.no_strip:                          # the post model's turnaround of a held-out frame
        post = next(ln.split()[-1] for ln in lines[:-1] if ln.split()[0] == "post")
        version = next(ln.split()[-1] for ln in lines[:-1] if ln.split()[0] == "dataprep")
        started = time.perf_counter()
        strip = json.loads(pippo_python(
            "import json, sys; from pipelines.evaluation import EvalConfig, turnaround_strip; "
            "r = turnaround_strip(EvalConfig(checkpoint=sys.argv[1], dataset=sys.argv[2], holdout_fraction=0.25, "
            f"views={s['cameras']}, resolution={s['resolution']}, steps={s['eval_steps']}, guidance={s['guidance']}), "
            "sys.argv[3]); "
            "print(json.dumps(r))", [post, version, str(out / "heldout_turnaround.png")], env, log))
        seconds["strip"] = time.perf_counter() - started
        evals["post"] = {**evals["post"], "strip": strip}
    command = "python benches/learning.py " + " ".join(sys.argv[1:])
    text = report(evals, curves, args.scale, command.strip(), seconds)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"scale": s, "evals": evals, "curves": curves, "seconds": seconds}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
