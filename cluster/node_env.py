"""Write a node's environment file from the cloud's secret store (Ray cluster launcher nodes).

    python node_env.py aws pippo/cluster-env   [--region us-west-2] [--out ~/.pippo/cluster.env]
    python node_env.py gcp pippo-cluster-env   [--project my-project]

The secret holds one JSON object of environment variables: the Ray token (RAY_AUTH_TOKEN), object
store / MLflow credentials and cluster-wide defaults (PIPPO_STORE, MLFLOW_TRACKING_URI, ...).
The launcher YAMLs (cluster/aws.yaml, cluster/gcp.yaml) run this in setup_commands and source the
file before `ray start`, so every Ray process and job on the node inherits the variables while
no value ever sits in a YAML file, a command line or a log: the file is written 0600 and only
the variable NAMES are printed. Access comes from the node's identity (AWS instance profile,
GCP service account), not from keys. Standard library only (plus boto3 on AWS, which Ray's AWS
images and the autoscaler already need).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import sys
import urllib.request
from pathlib import Path

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def fetch_aws(secret_id: str, region: str | None) -> str:
    import boto3

    client = boto3.client("secretsmanager", region_name=region) if region else boto3.client("secretsmanager")
    return client.get_secret_value(SecretId=secret_id)["SecretString"]


def _get(url: str, headers: dict) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as r:
        return json.loads(r.read())


def fetch_gcp(secret: str, project: str | None) -> str:
    meta = "http://metadata.google.internal/computeMetadata/v1/"
    flavor = {"Metadata-Flavor": "Google"}
    if not project:
        req = urllib.request.Request(meta + "project/project-id", headers=flavor)
        with urllib.request.urlopen(req, timeout=10) as r:
            project = r.read().decode()
    token = _get(meta + "instance/service-accounts/default/token", flavor)["access_token"]
    url = (f"https://secretmanager.googleapis.com/v1/projects/{project}/secrets/{secret}"
           "/versions/latest:access")
    payload = _get(url, {"Authorization": f"Bearer {token}"})["payload"]["data"]
    return base64.b64decode(payload).decode()


def render(secret_json: str) -> tuple[str, list[str]]:
    """`export K='v'` lines for a JSON object of variables; refuses anything else."""
    try:
        values = json.loads(secret_json)
    except json.JSONDecodeError:
        raise SystemExit("node_env: the secret is not a JSON object of environment variables") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) and NAME.fullmatch(k) for k in values):
        raise SystemExit("node_env: the secret must be a JSON object {\"VAR\": \"value\", ...}")
    lines = [f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(values.items())]
    return "".join(lines), sorted(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cloud", choices=["aws", "gcp"])
    ap.add_argument("secret", help="AWS secret id / GCP secret name")
    ap.add_argument("--region", help="AWS region (default: the node's)")
    ap.add_argument("--project", help="GCP project (default: the node's)")
    ap.add_argument("--out", default="~/.pippo/cluster.env", help="file to write (mode 0600)")
    args = ap.parse_args(argv)
    raw = fetch_aws(args.secret, args.region) if args.cloud == "aws" else fetch_gcp(args.secret, args.project)
    text, names = render(raw)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(out.with_suffix(".tmp"), out)
    print(f"node_env: wrote {out} ({', '.join(names)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
