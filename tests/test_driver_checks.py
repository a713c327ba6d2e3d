"""Fail-fast checks on the driver (issue 16, items 2-5), through the real `pippo` command: a
stopped MLflow server, incompatible stages and checkpoints, exit codes and stdout, and configs
used from another directory."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
PIPPO = [sys.executable, "-m", "pipelines.cli"]


def pippo(*args, cwd=None, env=None, timeout=300):
    """(exit code, stdout, stderr, seconds) of `pippo ARGS` in a fresh process, this checkout's code."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    start = time.monotonic()
    proc = subprocess.run([*PIPPO, *map(str, args)], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pippo: error: "), stderr
    return lines[0]


# -- item 2: an unreachable tracking server is one line, in seconds ---------------------------------

@pytest.fixture(scope="module")
def stopped_mlflow_server(tmp_path_factory):
    """The URL of a real `mlflow server` on 127.0.0.1 that answered once and was then stopped:
    its port is closed (connection refused), as after a crash or a restart."""
    from pipelines.training.tracking import check_tracking_server

    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    with open(tmp / "server.log", "wb") as server_log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'db'}",
             "--artifacts-destination", str(tmp / "art")],
            stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/health", timeout=300)   # 2 shared cores: minutes under load
            assert check_tracking_server(url, timeout_s=60) == url          # a live server passes the check
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return url


@pytest.mark.parametrize("command", [
    ["compare"],
    ["compare", "--json"],
    # from another directory (item 5): every step's config, model and DeepSpeed file is found
    # before the tracking check, which comes before any data is read or Ray starts
    ["train", REPO / "configs/stages/pretrain.yaml", "steps=2"],
    ["pipeline", "run", REPO / "configs/pipelines/demo.yaml"],
])
def test_stopped_tracking_server_is_one_line_in_seconds(stopped_mlflow_server, tmp_path, command):
    code, out, err, seconds = pippo(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": stopped_mlflow_server,
                                                                 "PIPPO_STORE": str(tmp_path / "store")})
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert stopped_mlflow_server in line and "not reachable" in line and "connection refused" in line
    assert seconds < 20, f"{command}: {seconds:.1f} s to the error line"
    assert "ray" not in err.lower()       # the check comes before Ray starts


# -- item 5: paths inside a config resolve against the config's file -------------------------------

def test_config_paths_resolve_against_the_config_file(tmp_path, monkeypatch, caplog):
    from pipelines.training.launcher import load_stage_config

    (tmp_path / "cfg" / "models").mkdir(parents=True)
    (tmp_path / "cfg" / "models" / "m.yaml").write_text("name: test\n")
    (tmp_path / "cfg" / "stage.yaml").write_text(
        f"stage: pretrain\ndataset: d\nmodel: models/m.yaml\ndeepspeed: {REPO}/configs/deepspeed/zero2.json\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_stage_config(tmp_path / "cfg" / "stage.yaml")
    assert cfg.model == str(tmp_path / "cfg" / "models" / "m.yaml")
    # an override is a command-line path: relative to the working directory, as written
    assert load_stage_config(tmp_path / "cfg" / "stage.yaml", ["model=mine.yaml"]).model == "mine.yaml"
    # the run's name follows the files' content, not where they are: same name from any directory
    monkeypatch.chdir(tmp_path)
    assert load_stage_config("cfg/stage.yaml").resolved_run_name() == cfg.resolved_run_name()

    # back-compat: a config naming a path relative to the working directory still works, with a warning
    (tmp_path / "cfg" / "old.yaml").write_text("stage: pretrain\ndataset: d\nmodel: cfg/models/m.yaml\n")
    assert load_stage_config("cfg/old.yaml").model == "cfg/models/m.yaml"
    assert "relative to the config's own directory" in caplog.text
