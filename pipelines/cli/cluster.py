"""`pippo submit` and `pippo jobs ...`: Ray jobs on a cluster. The work is the cluster package's
(it never imports pipelines); these handlers only hand it the parsed arguments."""
from __future__ import annotations

import argparse

from pipelines.cli.args import add_command, add_group, json_flag


def register(top) -> None:
    p = add_command(top, "submit", submit, "run `pippo ARGS...` as a Ray job on a cluster",
                    "Run `pippo ARGS...` on a Ray cluster through the Jobs API. The job ships this source "
                    "tree (working_dir) and, by default, the package's dependencies pinned to "
                    "requirements.lock (a stock Ray image needs nothing installed; ray itself comes from "
                    "the cluster; torch's build follows --torch). Only git-tracked files and files ARGS "
                    "name are shipped, never credential-shaped files or symlinks out of the tree. "
                    "PIPPO_STORE, PIPPO_VERBOSITY, MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, "
                    "AWS_ENDPOINT_URL(_S3) and AWS_REGION / AWS_DEFAULT_REGION are forwarded when set, and "
                    "nothing else; credentials never are (the cluster's own environment or Secrets supply "
                    "them) and ARGS holding one are refused. The submission id is derived from the arguments, "
                    "the code and the environment: submitting the same thing again returns the existing "
                    "job. Prints the submission id alone on the last stdout line; --wait streams the job's "
                    "logs to stderr and exits 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED. Token-auth "
                    "clusters: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.\n\nexamples:\n"
                    "  export RAY_ADDRESS=http://127.0.0.1:8265   # e.g. `ray dashboard cluster/aws.yaml`\n"
                    "  pippo submit --wait -- pipeline run configs/pipelines/demo.yaml\n"
                    "  pippo submit --entrypoint-num-cpus 1 -- train configs/stages/mid.yaml workers=8\n"
                    "  pippo submit --no-install --address http://head:8265 -- data build configs/datasets/demo.yaml\n"
                    "  pippo submit --dry-run -- train configs/stages/mid.yaml   # what would be shipped\n"
                    "  pippo submit --torch cuda -- train configs/stages/mid.yaml   # GPU workers on demand\n"
                    "  pippo jobs logs pippo-pipeline-run-0123456789abcdef --follow")
    p.add_argument("--address", help="Ray dashboard URL, http://HEAD:8265 (default RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs (stderr) until it ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--submission-id", metavar="ID",
                   help="use this id instead of the one derived from args + code + environment")
    p.add_argument("--retry", action="store_true",
                   help="if a job with this id FAILED or was STOPPED, replace it with a new run")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install the pinned dependencies: the cluster's image already "
                        "has them (also PIPPO_SUBMIT_INSTALL=0)")
    p.add_argument("--torch", choices=["auto", "cpu", "cuda"], default="auto",
                   help="torch build to pip-install: auto (default) = the CUDA build if the cluster "
                        "has GPUs now or --entrypoint-num-gpus > 0, else the CPU build (no multi-GB "
                        "CUDA wheels on a CPU cluster); use cuda when GPU workers start on demand")
    p.add_argument("--torch-index-url", metavar="URL",
                   help="extra pip index for torch, overriding --torch, e.g. "
                        "https://download.pytorch.org/whl/cu128")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files the job would ship and their total size; submit nothing")
    p.add_argument("--entrypoint-num-cpus", type=float, metavar="N",
                   help="CPUs reserved for the job's driver (Ray default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, metavar="N",
                   help="GPUs reserved for the job's driver (Ray default 0)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="one more non-secret environment variable for the job (repeatable)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the pippo arguments")

    jsub = add_group(top, "jobs", "list, follow and stop Ray jobs on a cluster",
                     "The Ray jobs of a cluster (--address or RAY_ADDRESS; "
                     "token as for `pippo submit`).", "jobs_command")
    p = add_command(jsub, "list", list_jobs, "submitted jobs with status, start and command")
    p.add_argument("--address", help="Ray dashboard URL (default RAY_ADDRESS)")
    json_flag(p)
    p = add_command(jsub, "logs", logs, "a job's logs on stdout")
    p.add_argument("id", help="submission id")
    p.add_argument("--follow", action="store_true",
                   help="stream until the job ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--address", help="Ray dashboard URL (default RAY_ADDRESS)")
    p = add_command(jsub, "stop", stop, "stop a job and print its final status")
    p.add_argument("id", help="submission id")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the job to end (default 60)")
    p.add_argument("--address", help="Ray dashboard URL (default RAY_ADDRESS)")


def submit(args) -> int:
    from cluster.submit import main

    return main(args)


def list_jobs(args) -> int:
    from cluster.jobs import list_jobs as run

    return run(args)


def logs(args) -> int:
    from cluster.jobs import logs as run

    return run(args)


def stop(args) -> int:
    from cluster.jobs import stop as run

    return run(args)
