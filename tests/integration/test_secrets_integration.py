"""Issue 15 items 3 and 10: one redactor for the whole project; secret values (keys, tokens,
passwords), never identifiers, are kept out of every file, MLflow entry, log and output line; names
and paths never derive from a secret; `pippo compare` prints no terminal escapes.

The redactor's cases run in-process; the end-to-end checks run the real `pippo pipeline run` /
`pippo data build` / a Ray task in fresh processes (their own Ray temp dir, their own MLflow
sqlite file) and then search every byte they wrote for the secrets."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRET15"     # AWS_SECRET_ACCESS_KEY
TOKEN = "hf_t0kenValue15xyzw"                                   # HF_TOKEN
BUCKET_ID = "humans-bucket-15"                                  # AWS_ACCESS_KEY_ID == a bucket name
SECRETS = (SECRET_KEY, TOKEN, "K7MDENG/bPxRfiCY")


def _files_holding(root: Path, needles=SECRETS) -> list[str]:
    """Every file under `root` whose bytes contain a secret (the sqlite db and Ray's logs too)."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.is_socket():
            data = p.read_bytes()
            hits += [f"{p.relative_to(root)}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


# ---- the one redactor ------------------------------------------------------------------------------


# ---- through the real commands ---------------------------------------------------------------------

@pytest.fixture
def secret_env(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="pr")     # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "HF_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": BUCKET_ID,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}", "RAY_TMPDIR": ray_tmp,
           "PIPPO_STORE": str(tmp_path / "store"), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "mlflow").mkdir()
    yield env, Path(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_pipeline_step_records_and_mlflow_hold_no_secret(tmp_path, capsys, monkeypatch):
    """`pippo pipeline run` (steps in-process, no Ray: cheap) whose synth step has a param
    ${AWS_SECRET_ACCESS_KEY}: the step record, MLflow (params, tags, names; the sqlite file and the
    artifacts) and the output hold `${AWS_SECRET_ACCESS_KEY}`, never the value."""
    from pippo_common.logs import unconfigure
    from pipelines.cli import main
    for k, v in {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "HF_TOKEN": TOKEN, "PIPPO_WORKFLOW_INPROCESS": "1",
                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}.items():
        monkeypatch.setenv(k, v)
    store = tmp_path / "store"
    cfg = {"name": "sec", "experiment": "sec-test", "workdir": str(tmp_path / "work"), "store": str(store),
           "steps": {"data": {"kind": "synth", "params": {
               "captures": 1, "cameras": 2, "frames": 1, "height": 32, "width": 32, "photos": 1,
               "note": "${AWS_SECRET_ACCESS_KEY}", "mirror": "https://bob:${HF_TOKEN}@h.example/x"}}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    try:
        code = main(["pipeline", "run", str(tmp_path / "p.yaml")])
    finally:
        unconfigure()
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert not [s for s in SECRETS if s in out + err]
    assert _files_holding(tmp_path) == []
    (record,) = [json.loads(p.read_text()) for p in store.glob("pipelines/sec/steps/data/*.json")]
    assert record["config"]["note"] == "${AWS_SECRET_ACCESS_KEY}"
    assert record["config"]["mirror"] == "https://***@h.example/x"

    import mlflow
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("sec-test").experiment_id])
              if r.data.params]
    assert run.data.params["synth.note"] == "${AWS_SECRET_ACCESS_KEY}"


def test_data_build_and_ray_workers_leave_no_secret(tmp_path, secret_env):
    """The real `pippo data build` (local store, local Ray) of a config holding ${HF_TOKEN} and a
    dataset path holding ${AWS_ACCESS_KEY_ID}, then a Ray task that logs and prints a secret: the
    store, Ray's session logs and the output hold no secret; the identifier stays in clear in the
    immutable version record; the worker's lines show ${HF_TOKEN} (it recomputes the secret set
    from the environment it inherits)."""
    from dataprep.studio.synth import synth_images
    env, ray_tmp = secret_env
    synth_images(tmp_path / "photos", count=2, seed=3, person_fraction=1.0)
    store = tmp_path / "store"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({
        "dataset": str(store / "${AWS_ACCESS_KEY_ID}" / "datasets" / "humans"), "resolution": 32,
        "plucker_stride": 8, "partitions": 1, "workers": 1, "preview_samples": 0,
        "inputs": {"local_roots": ["/nonexistent/${HF_TOKEN}"]},
        "sources": [{"kind": "images", "uri": str(tmp_path / "photos")}]}))
    script = """
import logging, os, sys, ray
from pipelines.cli import main
code = main(["data", "build", sys.argv[1]])
@ray.remote
def leak(secret):
    logging.getLogger("pippo.t15").warning("worker log %s", secret)
    print("worker print", secret, flush=True)
    return 1
assert code == 0 and ray.get(leak.remote(os.environ["HF_TOKEN"])) == 1
ray.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b.yaml")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [s for s in SECRETS if s in proc.stdout + proc.stderr]
    assert _files_holding(tmp_path) == [] and _files_holding(ray_tmp) == []
    logs = "".join(p.read_text(errors="replace") for p in ray_tmp.rglob("worker-*") if p.is_file())
    assert "worker log ${HF_TOKEN}" in logs and "worker print ${HF_TOKEN}" in logs, logs[-2000:]

    dataset = store / BUCKET_ID / "datasets" / "humans"
    (record_path,) = (dataset / "versions").glob("*.json")
    record = json.loads(record_path.read_text())
    assert "${AWS_ACCESS_KEY_ID}" not in json.dumps(record)
    assert record["config"]["dataset"] == str(dataset)
    assert record["config"]["inputs"]["local_roots"] == ["/nonexistent/${HF_TOKEN}"]
    assert record["id"] in proc.stdout.splitlines()      # the result line (a worker line follows it)


def test_compare_prints_no_terminal_escapes(tmp_path, monkeypatch):
    from pipelines.cli import main
    from pipelines.tracking import RunTracker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    evil = "run\x1b]0;owned\x07\x1b[2J\x1b[31mred"
    with RunTracker("esc-test", evil, step_tag="pretrain", system_metrics=False,
                    tags={"pippo.checkpoint": "/ckpt/\x1b[1Afinal", "pippo.dataset_version": "v\x1b[0m1"}):
        pass
    out, err = io.StringIO(), io.StringIO()
    from contextlib import redirect_stderr, redirect_stdout
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["compare", "--experiment", "esc-test", "--out", str(tmp_path / "cmp")])
    from pippo_common.logs import unconfigure
    unconfigure()
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "runred" in text and "/ckpt/final" in text
    assert not any(c in text for c in "\x1b\x07\x9b"), repr(text)
