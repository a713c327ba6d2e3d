"""The README's main job, configs/pipelines/demo.yaml, end to end at its smallest scale (the same
config, shrunk by overrides): synth -> dataprep -> pretrain -> mid -> post -> eval on Ray, then
`pippo compare --json` lists every step, and a no-change re-run is all cache hits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# holdout 0.5 of 8 frames: the held-out set (by key hash; keys hash the tmp path) is empty
# only with probability 2^-8
SMALL_MODEL = "{dim: 32, depth: 1, heads: 2, camera_hidden: 32, resolution: 32}"
SMALLEST = [
    "steps.data.params={captures: 2, cameras: 6, frames: 4, height: 96, width: 64, photos: 8, seed: 0}",
    "steps.dataprep.overrides.resolution=32", "steps.dataprep.overrides.plucker_stride=8",
    "steps.dataprep.overrides.face_resolution=16",
    *[f"steps.{s}.overrides.{k}" for s in ("pretrain", "mid", "post") for k in (
        "steps=2", f"model_overrides={SMALL_MODEL}", "data.resolution=32", "data.num_workers=0",
        "data.holdout_fraction=0.5", "workers=1", "tracking.sample_every=0", "tracking.system_metrics=false")],
    *[f"steps.{e}.overrides.{k}" for e in ("eval_mid", "eval") for k in (
        "resolution=32", "samples=1", "steps=2", "holdout_fraction=0.5")],
]


def pippo(*args, env):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=900)


def test_demo_pipeline_smallest_then_compare(tmp_path):
    env = {**os.environ, "PIPPO_STORE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    args = ["pipeline", "run", "configs/pipelines/demo.yaml", *SMALLEST, f"workdir={tmp_path / 'work'}"]
    proc = pippo(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    states = {ln.split()[0]: ln.split()[1] for ln in lines[:-1]}
    assert states == {s: "ran" for s in ("data", "dataprep", "pretrain", "mid", "post", "eval_mid", "eval")}
    proc = pippo(*args, env=env)
    assert {ln.split()[1] for ln in proc.stdout.strip().splitlines()[:-1]} == {"cached"}

    proc = pippo("compare", "--experiment", "pippo-demo", "--out", str(tmp_path / "cmp"), "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    steps = {r["step"] for r in doc["runs"]} if isinstance(doc.get("runs"), list) else set()
    assert {"dataprep", "pretrain", "mid", "post", "eval"} <= steps, doc.keys()
    # the stages' evals side by side (held-out cameras of held-out frames and of seen frames, the
    # wrong-camera control); the RE needs real resolution (the demo's own scale, not this one)
    assert list(doc["stage_evals"]) == ["mid", "post"]
    for stage, metrics in doc["stage_evals"].items():
        for key in ("eval/psnr", "eval/psnr_seen", "eval/psnr_wrong_camera"):
            assert metrics[key] == metrics[key], (stage, key, metrics)
