"""cluster/ without a cluster: the manifests (Ray cluster launcher, KubeRay) against their schemas
with no literal secrets, and submissions refused before any network (the real token-auth Ray
head: tests/e2e/test_cluster.py)."""
import json
import re
from argparse import Namespace
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import submit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]
SECRETISH = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY", re.I)


# ---- manifests -------------------------------------------------------------------------------
def test_launcher_configs_match_rays_schema():
    import ray
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for path in LAUNCHER:
        cfg = yaml.safe_load(path.read_text())
        jsonschema.validate(cfg, schema)
        types = cfg["available_node_types"]
        assert cfg["head_node_type"] in types, path
        assert sum(t.get("max_workers", 0) for t in types.values()) >= cfg["max_workers"] > 0
        assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no tasks on the head
        gpu = [n for n, t in types.items() if n.startswith("gpu")]
        assert len(gpu) >= 2 and all(types[n].get("min_workers", 0) == 0 for n in gpu)
        start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
        assert start.count("RAY_AUTH_MODE=token") == 2 and "cluster.env" in start
        # the helper the nodes run is shipped by file_mounts, relative to the repo root
        assert all((ROOT / local).is_file() for local in cfg["file_mounts"].values())
    aws, gcp = (yaml.safe_load(p.read_text()) for p in LAUNCHER)
    assert {t["node_config"]["InstanceType"][:3] for t in aws["available_node_types"].values()} >= {"g5.", "p4d"}
    assert any(t["node_config"]["machineType"].startswith("a2-") for t in gcp["available_node_types"].values())


def kuberay_docs():
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def test_kuberay_manifests_match_the_crd_subset():
    schema = json.loads((CLUSTER / "kuberay" / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    kinds = set()
    for path, doc in kuberay_docs():
        jsonschema.Draft202012Validator(schema).validate(doc)
        kinds.add(doc["kind"])
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == "2.60.0" and spec["authOptions"] == {"mode": "token"}
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(gpu["nvidia.com/gpu"]) >= 1
    assert kinds == {"RayCluster", "RayJob"}
    job = yaml.safe_load(KUBERAY[1].read_text())
    assert "pippo pipeline run configs/pipelines/demo.yaml" in job["spec"]["entrypoint"]
    # a typo is an error, not a silently pruned field
    bad = yaml.safe_load(KUBERAY[0].read_text())
    bad["spec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def literal_secrets(tree, where="") -> list[str]:
    """Places where a secret-looking name is given a value instead of a reference."""
    found = []
    if isinstance(tree, dict):
        if "name" in tree and ("value" in tree or "valueFrom" in tree) and SECRETISH.search(str(tree["name"])):
            ref = tree.get("valueFrom", {})
            if "value" in tree or "secretKeyRef" not in ref:          # K8s env var
                found.append(f"{where}: env {tree['name']} is not a secretKeyRef")
        for k, v in tree.items():
            if SECRETISH.search(str(k)) and isinstance(v, (str, int)) and str(v) and not str(v).startswith("$"):
                found.append(f"{where}.{k}: literal value")
            found += literal_secrets(v, f"{where}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found += literal_secrets(v, f"{where}[{i}]")
    elif isinstance(tree, str):
        # shell assignments in commands: NAME=value where value is not a $reference
        for m in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)=(\S+)", tree):
            if SECRETISH.search(m.group(1)) and not m.group(2).startswith(("$", '"$', "'$")):
                found.append(f"{where}: {m.group(1)}= literal in a command")
        if re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", tree):
            found.append(f"{where}: credential material")
    return found


def test_manifests_hold_no_literal_secrets():
    for path in LAUNCHER:
        assert literal_secrets(yaml.safe_load(path.read_text()), path.name) == []
    for path, doc in kuberay_docs():
        assert literal_secrets(doc, path.name) == []
        envs = [e for c in _containers(doc) for e in c.get("env", [])]
        refs = {e["name"] for e in envs if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN"} <= refs
    # the checker itself catches what it is for
    doc = yaml.safe_load(KUBERAY[0].read_text())
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})
    assert literal_secrets(doc)
    assert literal_secrets(["export AWS_SECRET_ACCESS_KEY=abc && ray start"])
    assert literal_secrets({"aws_access_key_id": "AKIAABCDEFGHIJKLMNOP"})
    assert not literal_secrets(["export RAY_AUTH_TOKEN=$(cat /run/secrets/ray) && ray start"])


def _containers(doc):
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


# ---- the job a submission builds (no cluster needed) ------------------------------------------
def job_args(*pippo_args, **kw):
    base = dict(args=["--", *pippo_args], no_install=False, torch_index_url=None, torch="auto", env=None,
                submission_id=None, entrypoint_num_cpus=None, entrypoint_num_gpus=None)
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(env=["AWS_SECRET_ACCESS_KEY=x"]), "secrets never travel"),
    (dict(env=["HF_TOKEN=x"]), "secrets never travel"),
    (dict(env=["NOEQUALS"]), "expected KEY=VALUE"),
    (dict(entrypoint_num_cpus=-1), "must be >= 0"),
])
def test_bad_submissions_are_refused_before_any_network(kw, message):
    with pytest.raises(submit.SubmitError, match=message):
        submit.build_job(job_args("data", "versions", "x", **kw), ROOT)


@pytest.mark.parametrize("uri", ["https://user:pw@mlflow.example", "https://TOKEN123@mlflow.example",
                                 "https://mlflow.example/?token=abc123"])
def test_tracking_uri_with_credentials_is_refused(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(submit.SubmitError, match="MLFLOW_TRACKING_URI .*credentials") as err:
        submit.build_job(job_args("compare"), ROOT)
    assert "pw" not in str(err.value) and "TOKEN123" not in str(err.value) and "abc123" not in str(err.value)


# ---- a real token-auth Ray head ---------------------------------------------------------------
