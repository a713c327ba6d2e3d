"""RunTracker against real MLflow: the embedded sqlite store and `mlflow server` over HTTP."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import free_port, wait_http
from PIL import Image

from pipelines.tracking import RunTracker

SECRETS = ["AKIAIOSFODNN7EXAMPLE", "s3cr3t/Val+ue", "pw123zz", "abcTOK987", "xyzSECRET42",
           "hunter2qq"]
SECRET_CONFIG = {
    "data": {"uri": "s3://AKIAIOSFODNN7EXAMPLE:s3cr3t/Val+ue@bucket/x",
             "mirror": "https://user:pw123zz@host/a?token=abcTOK987&page=2"},
    "storage_options": {"aws_secret_access_key": "xyzSECRET42", "endpoint": "http://127.0.0.1:9"},
    "cmd": "sync --password=hunter2qq",
    "model": {"max_tokens": 77, "sort_key": "camera"},
}


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow") / ".pippo"
    root.mkdir()
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def on_sqlite(sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return sqlite_uri


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    # Own session: `mlflow server` runs uvicorn as a child, and both must go at teardown.
    server_log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'db'}", "--artifacts-destination", str(tmp / "art")],
        stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=60)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):   # it may have died on its own
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server_log.close()


def _history(tracker, key):
    return [(m.step, m.value) for m in sorted(tracker.client.get_metric_history(tracker.run_id, key),
                                              key=lambda m: m.step)]


FRESH_PROCESS = """
import json, sys, mlflow
from mlflow import MlflowClient
runs = mlflow.search_runs(experiment_names=[sys.argv[1]], output_format="list",
                          filter_string="tags.`pippo.step` = 'pretrain'")
c = MlflowClient()
print(json.dumps([{
    "run_id": r.info.run_id, "status": r.info.status, "params": r.data.params,
    "metrics": r.data.metrics, "tags": r.data.tags,
    "datasets": [[d.dataset.digest, d.dataset.source, d.tags[0].value]
                 for d in r.inputs.dataset_inputs],
    "artifacts": [f.path for f in c.list_artifacts(r.info.run_id, "samples")],
    "versions": [[str(v.version), v.source, v.run_id]
                 for v in c.search_model_versions(f"name='{sys.argv[2]}'")],
    "artifact_location": c.get_experiment(r.info.experiment_id).artifact_location,
} for r in runs]))
"""


def test_sqlite_run_is_found_from_a_fresh_process(on_sqlite, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    ckpt = (tmp_path / "ckpt" / "model.safetensors").as_uri()
    with RunTracker("pippo-test", "pretrain", step_tag="pretrain", tags={"pippo.config": "t"}) as t:
        assert t.last_logged_step == -1
        t.log_params({"train": {"lr": 1e-4, "steps": 5}, "long": "x" * 7000})
        for step in range(5):
            t.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-4}, step)
        t.log_dataset("s3://bucket/datasets/captures", "0123456789abcdef0123", "captures")
        t.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "samples/step_{step:06d}.png", step=100)
        t.set_tags({"pippo.checkpoint": ckpt})
        assert t.register_model("pippo-test-pretrain", ckpt) == "1"
        time.sleep(1.0)                     # a few system-metrics samples
        started = time.monotonic()
    assert time.monotonic() - started < 3   # the system-metrics thread stops promptly
    assert not [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor"]
    out, err = capfd.readouterr()
    assert out == "" and "INFO" not in err, (out, err)   # quiet: no "View run", no alembic chatter

    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, "pippo-test", "pippo-test-pretrain"],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    [run] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["run_id"] == t.run_id and run["status"] == "FINISHED"
    assert run["params"]["train.lr"] == "0.0001" and len(run["params"]["long"]) == 6000
    assert run["metrics"]["train/loss"] == pytest.approx(0.2)
    assert any(k.startswith("system/cpu") for k in run["metrics"])
    assert run["tags"]["pippo.step"] == "pretrain" and run["tags"]["pippo.checkpoint"] == ckpt
    source = json.dumps({"uri": "s3://bucket/datasets/captures"})
    assert run["datasets"] == [["0123456789abcdef0123", source, "training"]]
    assert run["artifacts"] == ["samples/step_000100.png"]
    assert run["versions"] == [["1", ckpt, t.run_id]]
    db_dir = Path(on_sqlite[len("sqlite:///"):]).parent
    assert run["artifact_location"] == (db_dir / "mlartifacts" / "pippo-test").as_uri()


def test_resume_continues_one_curve(on_sqlite):
    first = RunTracker("pippo-test", "mid", step_tag="mid", system_metrics=False)
    for step in range(10):
        first.log_metrics({"train/loss": float(step)}, step)
    first.flush()                           # ... then the job dies: no end(), run left RUNNING
    with RunTracker("pippo-test", step_tag="mid", resume_run_id=first.run_id,
                    system_metrics=False) as again:
        assert again.run_id == first.run_id and again.last_logged_step == 9
        for step in range(5, 15):           # recomputed after the step-5 checkpoint
            again.log_metrics({"train/loss": 100.0 + step}, step)
    hist = _history(again, "train/loss")
    assert [s for s, _ in hist] == list(range(15))
    assert [v for _, v in hist] == [float(s) for s in range(10)] + [100.0 + s for s in range(10, 15)]
    assert again.client.get_run(again.run_id).info.status == "FINISHED"


def test_child_run_under_parent_and_failure_status(on_sqlite):
    parent = RunTracker("pippo-test", "pipeline", step_tag="pipeline", system_metrics=False)
    with pytest.raises(RuntimeError):
        with RunTracker("pippo-test", "eval", step_tag="eval", parent_run_id=parent.run_id,
                        system_metrics=False) as child:
            raise RuntimeError("eval crashed")
    parent.end()
    parent.end()                            # idempotent
    run = child.client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.status == "FAILED"


def test_no_secret_reaches_mlflow(on_sqlite, tmp_path):
    t = RunTracker("pippo-test", "secrets", step_tag="dataprep", system_metrics=False,
                   tags={"origin": SECRET_CONFIG["data"]["mirror"]})
    t.log_params(SECRET_CONFIG)
    t.set_tags({"pippo.source": SECRET_CONFIG["data"]["uri"], "token": "abcTOK987"})
    t.log_dataset(SECRET_CONFIG["data"]["uri"], "v1", "captures", extra=SECRET_CONFIG)
    t.log_artifact_bytes(json.dumps(SECRET_CONFIG).encode(), "config/job.json")
    t.log_artifact_bytes(b"storage:\n  aws_secret_access_key: xyzSECRET42\n", "config/job.yaml")
    version = t.register_model("pippo-test-secrets", SECRET_CONFIG["data"]["uri"] + "/model.safetensors")
    t.end()
    run = t.client.get_run(t.run_id)
    mv = t.client.get_model_version("pippo-test-secrets", version)
    local = t.client.download_artifacts(t.run_id, "config", str(tmp_path))
    seen = json.dumps([run.data.params, run.data.tags, mv.source, mv.tags,
                       [(d.dataset.source, d.dataset.profile) for d in run.inputs.dataset_inputs],
                       [p.read_text() for p in sorted(Path(local).iterdir())]])
    assert "bucket/x" in seen and "xyzSECRET42" not in seen
    assert [s for s in SECRETS if s in seen] == []


@pytest.mark.slow
def test_http_server_run(mlflow_server, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    t = RunTracker("pippo-http", "post", step_tag="post", system_metrics=False)
    t.log_params({"train": {"lr": 3e-5}})
    started = time.perf_counter()
    for step in range(1000):
        t.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    enqueue_s = time.perf_counter() - started
    assert enqueue_s < 0.5, enqueue_s       # the trainer never waits on HTTP
    t.log_image(_png(), "samples/step_000999.png")
    local_ckpt = (tmp_path / "ckpt" / "model.safetensors").as_uri()
    assert t.register_model("pippo-http-post", "s3://ckpts/post/model.safetensors") == "1"
    assert t.register_model("pippo-http-post", local_ckpt) == "2"
    t.end()
    hist = _history(t, "train/loss")
    assert [s for s, _ in hist] == list(range(1000))
    run = t.client.get_run(t.run_id)
    assert run.data.params == {"train.lr": "3e-05"} and run.info.status == "FINISHED"
    assert [f.path for f in t.client.list_artifacts(t.run_id, "samples")] == ["samples/step_000999.png"]
    v1, v2 = (t.client.get_model_version("pippo-http-post", v) for v in ("1", "2"))
    assert v1.source == "s3://ckpts/post/model.safetensors" and v1.run_id == t.run_id
    assert v2.tags["pippo.checkpoint"] == local_ckpt and v2.run_id == t.run_id
    pointer = t.client.download_artifacts(t.run_id, "registered/pippo-http-post/checkpoint_uri.txt",
                                          str(tmp_path))
    assert Path(pointer).read_text() == local_ckpt
    assert "View run" not in capfd.readouterr().out

    with RunTracker("pippo-http", step_tag="post", resume_run_id=t.run_id, system_metrics=False) as again:
        assert again.last_logged_step == 999
        for step in range(990, 1005):
            again.log_metrics({"train/loss": -1.0}, step)
    hist = _history(t, "train/loss")
    assert [s for s, _ in hist] == list(range(1005)) and hist[999][1] == pytest.approx(1e-3)


def _png() -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()
