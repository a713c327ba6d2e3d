"""Workflows: steps cached by code/config/input ids, downstream-only re-runs, resume of a failed
invocation, MLflow parent/child runs — on Ray, with the real build and trainer at tiny scale."""
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from dataprep.studio.synth import synth_images
from support import TINY_MODEL

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def train_step(stage, init_from=None, **over):
    o = {"dataset": "${steps.dataprep}", "steps": 2, "model_overrides": TINY_MODEL, "resources": {"ray": False},
         "data": {"resolution": 32, "batch_size": 2, "num_workers": 0, "views": 1 if stage == "pretrain" else 2,
                  "holdout_fraction": 0.0},
         "tracking": {"sample_every": 0, "log_every": 1, "system_metrics": False, "register_model": None},
         "checkpoint": {"every_steps": 2}, **over}
    if init_from:
        o["init_from"] = init_from
    return {"kind": "train", "config": str(REPO / f"configs/stages/{stage}.yaml"), "overrides": o}


def pipeline(tmp_path, photos_dir=None):
    dataprep_sources = [{"kind": "captures", "uri": "${steps.data.captures}"},
                        {"kind": "images", "uri": str(photos_dir) if photos_dir else "${steps.data.photos}"}]
    return {"name": "t", "experiment": "wf-test", "workdir": str(tmp_path / "work"), "steps": {
        "data": {"kind": "synth", "params": {"captures": 1, "cameras": 4, "frames": 3, "height": 96, "width": 64,
                                             "photos": 6}},
        "dataprep": {"kind": "dataprep", "config": str(REPO / "configs/datasets/demo.yaml"),
                     "overrides": {"dataset": str(tmp_path / "store/datasets/d"), "resolution": 32,
                                   "plucker_stride": 8, "face_crop": False, "sources": dataprep_sources}},
        "pretrain": train_step("pretrain"),
        "mid": train_step("mid", init_from="${steps.pretrain}")}}


def run(tmp_path, cfg, *args, env=None):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "pipeline", "run", str(path), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines()
    states = {ln.split()[0]: ln.split()[1] for ln in lines[:-1]}
    return proc, states, (lines[-1] if lines else ""), time.time() - start


@pytest.fixture()
def env(tmp_path, monkeypatch):
    import os
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPPO_STORE": str(tmp_path / "store")}


def children(parent_id):
    runs = mlflow.search_runs(experiment_names=["wf-test"], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["pippo.workflow_step"] if "pippo.workflow_step" in r.data.tags else r.data.tags["pippo.step"]: r
            for r in runs}


def all_children(parent_id) -> list:
    return mlflow.search_runs(experiment_names=["wf-test"], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def compare_rows(tmp_path, env, parent_id) -> list[dict]:
    """The rows `pippo compare --json` lists under one invocation's parent run."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "compare", "--experiment", "wf-test", "--json",
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    return [r for r in rows if r["parent_run_id"] == parent_id]


def output_of(proc, step: str) -> str:
    return next(ln.split()[-1] for ln in proc.stdout.splitlines() if ln.split()[:1] == [step])


def local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def test_cache_and_downstream_only_reruns(tmp_path, env):
    cfg = pipeline(tmp_path)
    proc, states, parent, first_took = run(tmp_path, cfg, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states == {"data": "ran", "dataprep": "ran", "pretrain": "ran", "mid": "ran"}
    kids = children(parent)
    assert {r.data.tags["pippo.step"] for r in kids.values()} == {"dataprep", "pretrain", "mid"}
    assert mlflow.get_run(parent).data.tags["pippo.pipeline"] == "t"

    proc, states, parent2, took = run(tmp_path, cfg, env=env)      # no change: nothing runs
    assert proc.returncode == 0 and set(states.values()) == {"cached"} and parent2 != parent
    assert len(children(parent2)) == 4
    cached = children(parent2)["pretrain"].data.tags          # a step's tags hold its output, cached or not
    assert cached["pippo.cached"] == "true" and cached["pippo.checkpoint"].endswith("/final-step_00000002")
    # nothing ran: the re-run costs the driver, far less than the run that trained
    assert took < first_took / 2, f"no-change re-run {took:.1f} s vs first run {first_took:.1f} s"

    cfg["steps"]["mid"]["overrides"]["optim"] = {"lr": 3e-4}      # change mid only
    proc, states, _, _ = run(tmp_path, cfg, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states == {"data": "cached", "dataprep": "cached", "pretrain": "cached", "mid": "ran"}

    cfg["steps"]["pretrain"]["overrides"]["optim"] = {"lr": 2e-4}  # change pretrain: mid follows
    proc, states, _, _ = run(tmp_path, cfg, env=env)
    assert states == {"data": "cached", "dataprep": "cached", "pretrain": "ran", "mid": "ran"}
    before = output_of(proc, "pretrain")                         # final-step_00000002 of this config's run
    weights = (local(before) / "model.safetensors").read_bytes()

    # more steps: the same training run continues (steps are not in its name) into a NEW final;
    # the earlier output keeps its weights, and mid (downstream of the new weights) runs again
    cfg["steps"]["pretrain"]["overrides"]["steps"] = 4
    proc, states, parent5, _ = run(tmp_path, cfg, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states == {"data": "cached", "dataprep": "cached", "pretrain": "ran", "mid": "ran"}
    longer = output_of(proc, "pretrain")
    assert before.endswith("/final-step_00000002") and longer.endswith("/final-step_00000004")
    assert local(longer).parent == local(before).parent
    assert (local(before) / "model.safetensors").read_bytes() == weights
    assert json.loads((local(before) / "info.json").read_text())["step"] == 2
    # this invocation has a row for each step, the resumed training run's included
    listed = compare_rows(tmp_path, env, parent5)
    rows = {r["step"]: r for r in listed}
    assert len(listed) == 4 and set(rows) == {"dataprep", "pretrain", "mid"}
    assert rows["pretrain"]["checkpoint"] == longer and rows["mid"]["checkpoint"].endswith("/final-step_00000002")


def test_resume_after_a_failed_step(tmp_path, env):
    photos = tmp_path / "late_photos"                # the dataprep step's source is not there yet
    cfg = pipeline(tmp_path, photos_dir=photos)
    proc, states, printed, _ = run(tmp_path, cfg, env=env)
    # input caused it (a missing source): exit 2, as documented; stdout holds the id to resume
    assert proc.returncode == 2 and "--resume" in proc.stderr
    parent = proc.stderr.split("--resume ")[-1].split()[0]
    assert printed == parent and proc.stdout.strip() == parent
    assert mlflow.get_run(parent).info.status == "FAILED"
    failed = children(parent)["dataprep"]                 # the failed step is listed under the parent
    assert failed.info.status == "FAILED" and "late_photos" in failed.data.tags["pippo.error"]
    synth_images(photos, 4, seed=1, person_fraction=1.0)
    proc, states, parent2, _ = run(tmp_path, cfg, "--resume", parent, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parent2 == parent and mlflow.get_run(parent).info.status == "FINISHED"
    assert states == {"data": "cached", "dataprep": "ran", "pretrain": "ran", "mid": "ran"}
    kids = children(parent)
    assert kids["mid"].data.tags["pippo.checkpoint"].endswith("/final-step_00000002")
    listed = [r.data.tags.get("pippo.workflow_step") for r in all_children(parent)]
    assert sorted(listed) == ["data", "dataprep", "dataprep", "mid", "pretrain"], listed   # data once
    proc, states, _, _ = run(tmp_path, cfg, "--resume", parent, env=env)   # again: all cached, none added
    assert proc.returncode == 0 and set(states.values()) == {"cached"}, proc.stderr[-3000:]
    assert len(all_children(parent)) == len(listed)


def test_bad_pipeline_config_is_one_line(tmp_path, env):
    cfg = pipeline(tmp_path)
    cfg["steps"]["mid"]["overrides"]["init_from"] = "${steps.nosuch}"
    proc, _, _, _ = run(tmp_path, cfg, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nosuch" in proc.stderr
    cfg = pipeline(tmp_path)
    cfg["steps"]["pretrain"]["overrides"]["optim"] = {"lr": "fast"}
    proc, _, _, _ = run(tmp_path, cfg, env=env)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr.strip().splitlines()[-1]
