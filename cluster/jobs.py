"""`pippo jobs list | logs ID [--follow] | stop ID`: the Ray jobs of a cluster (Jobs API).

Same address and token rules as `pippo submit` (cluster/submit.py): --address or RAY_ADDRESS,
the token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

from cluster.submit import TERMINAL, SubmitError, cli, connect, exit_code, follow, job_info, status_of
from pippo_common.errors import Failed


def _when(ms) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _require(client, sid: str):
    info = job_info(client, sid)
    if info is None:
        raise SubmitError(f"no job {sid!r} on {client.get_address()}")
    return info


@cli
def list_jobs(args) -> int:
    """Submitted jobs, oldest first: id, status, start, and what it runs."""
    client = connect(args.address)
    jobs = [j for j in client.list_jobs() if j.submission_id]   # skip plain ray.init() drivers
    jobs.sort(key=lambda j: (j.start_time or 0, j.submission_id))
    if args.json:
        print(json.dumps([{"submission_id": j.submission_id, "status": status_of(j),
                           "entrypoint": j.entrypoint, "message": j.message,
                           "start_time": j.start_time, "end_time": j.end_time,
                           "metadata": j.metadata or {}} for j in jobs], indent=1))
        return 0
    rows = [("SUBMISSION_ID", "STATUS", "STARTED", "RUNS")]
    for j in jobs:
        runs = (j.metadata or {}).get("pippo.args")
        rows.append((j.submission_id, status_of(j), _when(j.start_time),
                     f"pippo {runs}" if runs else j.entrypoint))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


@cli
def logs(args) -> int:
    """The job's logs on stdout; --follow streams them until it ends and exits with its status."""
    client = connect(args.address)
    _require(client, args.id)
    if not args.follow:
        sys.stdout.write(client.get_job_logs(args.id))
        sys.stdout.flush()
        return 0
    try:
        status = follow(client, args.id, sys.stdout)
    except KeyboardInterrupt:
        return 130
    return exit_code(client, args.id, status)


@cli
def stop(args) -> int:
    """Ask the job to stop, wait up to --timeout seconds for it to end, print its final status."""
    client = connect(args.address)
    info = _require(client, args.id)
    if status_of(info) not in TERMINAL:
        client.stop_job(args.id)
    deadline = time.time() + args.timeout
    while (status := status_of(client.get_job_info(args.id))) not in TERMINAL:
        if time.time() > deadline:
            why = ("" if status != "PENDING" else
                   ": Ray cannot stop a job whose driver has not started (ray-project/ray#56102); "
                   "it waits for entrypoint resources or its runtime env and fails after "
                   "RAY_JOB_START_TIMEOUT_SECONDS (900 s by default)")
            raise Failed(f"job {args.id} is still {status} after {args.timeout:g} s{why}")
        time.sleep(0.5)
    print(status)
    return 0
