"""`pippo submit` argument and environment rules in-process: secret flags refused, ordinary ones
passed, only allow-listed variables forwarded, the torch build rule (the file selection and
`--dry-run` through git and the real command: tests/e2e/test_cluster_shipping.py)."""
import os
from argparse import Namespace

import pytest

from cluster import job_env, submit

# credential-shaped files a careless tree holds; each is planted tracked AND untracked


@pytest.mark.parametrize("args", [["train", "c.yaml", "--password", "pw123456"],
                                  ["train", "c.yaml", "--api-key=pw123456"], ["train", "--token"]])
def test_secret_flags_are_refused(args):
    with pytest.raises(job_env.CredentialError) as err:
        job_env.refuse_credential_args(args)
    assert "pw123456" not in str(err.value)


@pytest.mark.parametrize("args", [["train", "configs/stages/mid.yaml", "workers=8", "max_tokens=5"],
                                  ["data", "build", "c.yaml", "sources.0.uri=https://h.example:8080/a@b"],
                                  ["data", "build", "c.yaml", "storage.key=${S3_KEY}"]])
def test_ordinary_args_pass(args):
    job_env.refuse_credential_args(args)


HOSTILE_ENV = {"OPENAI_KEY": "sk-1", "HF_AUTH": "hf-1", "DB_PWD": "pw-1", "GITHUB_PAT": "ghp-1",
               "WANDB_KEY": "wb-1", "AWS_SECRET_ACCESS_KEY": "aws-1", "AWS_ACCESS_KEY_ID": "AKIA-1",
               "AWS_SESSION_TOKEN": "st-1", "RAY_AUTH_TOKEN": "ray-1", "MLFLOW_TRACKING_PASSWORD": "ml-1",
               "PIPPO_SECRET": "p-1", "AWS_PROFILE": "prod", "RAY_ADDRESS": "http://head:8265"}


def test_only_allow_listed_environment_is_forwarded(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("PIPPO_", "MLFLOW_", "AWS_", "RAY_")):
            monkeypatch.delenv(k)
    for k, v in HOSTILE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PIPPO_STORE", "s3://bucket/pippo")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example:5000")
    assert job_env.job_env([]) == {"PIPPO_STORE": "s3://bucket/pippo", "AWS_REGION": "us-west-2",
                                   "MLFLOW_TRACKING_URI": "https://mlflow.example:5000"}
    assert job_env.job_env(["LOG_LEVEL=debug"])["LOG_LEVEL"] == "debug"
    for name in HOSTILE_ENV:
        if name not in ("AWS_PROFILE", "RAY_ADDRESS"):
            with pytest.raises(job_env.CredentialError, match=f"--env {name}: secrets never travel"):
                job_env.job_env([f"{name}=x"])
    for uri in ("https://TOKENVALUE@mlflow.example", "https://u:pwvalue@mlflow.example"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(job_env.CredentialError, match="MLFLOW_TRACKING_URI") as err:
            job_env.job_env([])
        assert "VALUE" not in str(err.value).upper().replace("A URL", "")


def torch_args(**kw):
    return Namespace(**{"torch_index_url": None, "torch": "auto", "entrypoint_num_gpus": None, **kw})


def test_torch_build_follows_the_cluster_unless_chosen():
    cpu = submit.CPU_TORCH_INDEX
    assert submit.torch_index(torch_args(), cluster_gpus=False)[0] == cpu
    assert submit.torch_index(torch_args(), cluster_gpus=True)[0] is None           # PyPI: CUDA
    assert submit.torch_index(torch_args(entrypoint_num_gpus=1), cluster_gpus=False)[0] is None
    assert submit.torch_index(torch_args(torch="cuda"), cluster_gpus=False)[0] is None
    assert submit.torch_index(torch_args(torch="cpu"), cluster_gpus=True)[0] == cpu
    url = "https://download.pytorch.org/whl/cu128"
    assert submit.torch_index(torch_args(torch="cpu", torch_index_url=url), cluster_gpus=False)[0] == url
    index, why = submit.torch_index(torch_args(), cluster_gpus=None)     # cluster did not say
    assert index is None and "could not tell" in why
