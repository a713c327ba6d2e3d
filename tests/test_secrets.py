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

from pippo_common import redact as redactor
from pippo_common.text import printable
from pippo_common.redact import (RedactingStream, check_not_secret, is_secret_env_name, is_secret_name, redact,
                             redact_text, register_secret, strip_credentials)

REPO = Path(__file__).resolve().parents[1]
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

def test_tracking_has_no_redactor_of_its_own():
    from pipelines.training import tracking
    assert tracking.redact is redactor.redact and tracking.redact_text is redactor.redact_text


@pytest.mark.parametrize("url", ["https://host:8080/a@b", "https://host:8080/a@b?x=1", "s3://b/key@v2",
                                 "https://medium.com/@user/p"])
def test_a_port_then_a_path_with_at_is_no_userinfo(url):
    # RFC 3986: the authority ends at the first "/", so "host:8080" is a host and a port
    assert strip_credentials(url) == url and redact_text(url) == url and redact({"u": url}) == {"u": url}


@pytest.mark.parametrize("url, shown", [
    ("https://user:pa/ss@host/x", "https://***@host/x"),          # a password with "/" (AWS keys)
    ("https://user:8080@host/x", "https://***@host/x"),           # digits then "@": a password
    ("https://ghp_tokenAsUser@github.com/o/r", "https://***@github.com/o/r"),
    ("see s3://AKID:se/cr+et@bucket/k here", "see s3://***@bucket/k here"),
])
def test_userinfo_is_masked(url, shown):
    assert redact_text(url) == shown and redact({"u": url})["u"] == shown


def test_secret_names_are_secrets_and_identifiers_are_not():
    for name in ("aws_secret_access_key", "password", "db_pwd", "hf_token", "X-Amz-Signature",
                 "api_key", "storage_options.key", "auth", "client_secret"):
        assert is_secret_name(name), name
    for name in ("aws_access_key_id", "AWS_ACCESS_KEY_ID", "access_key", "client_id", "max_tokens",
                 "tokenizer", "sort_key", "key_id", "author"):
        assert not is_secret_name(name), name
    for name in ("OPENAI_KEY", "WANDB_KEY", "GITHUB_PAT", "DB_PASS", "HF_AUTH", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_env_name(name), name
    for name in ("AWS_ACCESS_KEY_ID", "PWD", "OLDPWD", "MONKEY", "PIPPO_STORE", "AWS_REGION"):
        assert not is_secret_env_name(name), name


def test_env_secrets_are_redacted_and_identifiers_kept(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BUCKET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("OPENAI_KEY", "sk-openai-0123456789")
    monkeypatch.setenv("PWD", "/work/some/dir")
    line = f"s3://{BUCKET_ID}/datasets/humans in /work/some/dir with {SECRET_KEY} and sk-openai-0123456789"
    assert redact_text(line) == (f"s3://{BUCKET_ID}/datasets/humans in /work/some/dir with "
                                 "${AWS_SECRET_ACCESS_KEY} and ${OPENAI_KEY}")
    tree = {"dataset": f"s3://{BUCKET_ID}/datasets/humans", "aws_access_key_id": BUCKET_ID,
            "storage_options": {"secret": "x" * 9}, "resolution": 64, "max_tokens": 3}
    assert redact(tree) == {**tree, "storage_options": {"secret": "***"}}


def test_config_loader_registers_secret_named_variables_only(monkeypatch):
    from pippo_common.config import expand_env
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "bucket-as-key-id-1")
    monkeypatch.setenv("T15_DATASET_BUCKET", "plain-bucket-name")
    monkeypatch.setenv("T15_DB_PASSWORD", "pw-short")
    got = expand_env({"a": "s3://${AWS_ACCESS_KEY_ID}/x", "b": "s3://${T15_DATASET_BUCKET}/y",
                      "c": "postgres://u:${T15_DB_PASSWORD}@h/db"})
    assert got["c"] == "postgres://u:pw-short@h/db"
    monkeypatch.delenv("T15_DB_PASSWORD")              # still known: the loader registered it
    assert redact(got) == {"a": "s3://bucket-as-key-id-1/x", "b": "s3://plain-bucket-name/y",
                           "c": "postgres://***@h/db"}
    assert redact_text("pw-short") == "${T15_DB_PASSWORD}"


def test_names_never_derive_from_a_secret(monkeypatch):
    register_secret("registered-s3cret-15", "${T15_SECRET}")
    with pytest.raises(ValueError) as err:
        check_not_secret("run-registered-s3cret-15", "run_name")
    assert "registered-s3cret-15" not in str(err.value) and "${T15_SECRET}" in str(err.value)
    check_not_secret("run-plain", "run_name")
    check_not_secret("s3://user:registered-s3cret-15@b/x", "dataset")   # userinfo: storage refuses it


def test_redacting_stream_and_printable():
    register_secret("streamed-s3cret-15", "${T15_STREAM}")
    buf = io.StringIO()
    stream = RedactingStream(buf)
    print("result streamed-s3cret-15 https://u:pw@h/x", file=stream)
    assert buf.getvalue() == "result ${T15_STREAM} https://***@h/x\n"
    assert redactor.redacting(stream) is stream
    assert printable("run\x1b]0;pwned\x07\x1b[31mred\x1b[0m\x9b2J\u202eevil\nx") == "runred evil x"


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
    from dataprep.synth import synth_images
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


@pytest.mark.parametrize("tag, var, fragment", [
    ("${HF_TOKEN}", TOKEN, "comes from a secret"),           # secret-derived: refused, not shown
    ("${T15_RELEASE}", "../../escape", "invalid tag name"),  # validated after substitution
])
def test_a_tag_from_a_variable_is_checked_after_substitution(tag, var, fragment, tmp_path, capsys, monkeypatch):
    from pipelines.cli import main
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("T15_RELEASE", var)
    (tmp_path / "photos").mkdir()
    (tmp_path / "b.yaml").write_text(f"dataset: {tmp_path / 'ds'}\nsources: [{{kind: images, uri: {tmp_path / 'photos'}}}]\n"
                                     f"tags: ['{tag}']\n")
    try:
        assert main(["data", "build", str(tmp_path / "b.yaml")]) == 2
    finally:
        from pippo_common.logs import unconfigure
        unconfigure()
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert TOKEN not in err and not (tmp_path / "ds").exists()


def test_compare_prints_no_terminal_escapes(tmp_path, monkeypatch):
    from pipelines.cli import main
    from pipelines.training.tracking import RunTracker
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
