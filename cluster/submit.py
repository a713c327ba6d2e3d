"""`pippo submit`: run `pippo ARGS...` as a Ray job through the Jobs API.

What travels with a job (its runtime_env):
- `working_dir` = a private staging copy of the files cluster/shipping.py selects: the files git
  tracks plus the files ARGS name, never credential-shaped files nor anything a symlink points
  to outside the tree (`--dry-run` lists them with their total size and submits nothing). The
  entrypoint is `python -m pipelines.cli ARGS` inside that directory, i.e. `pippo ARGS` of the
  uploaded code whether or not the cluster's image has the package installed.
- `pip` = the package's runtime dependencies pinned to requirements.lock (DEFAULT), so a stock
  Ray image needs nothing pre-installed; Ray builds one virtualenv per distinct list per node
  and caches it, and pins the image already satisfies are not reinstalled (the virtualenv sees
  the image's site-packages). `ray` itself is never listed: the cluster's Ray is the one that
  runs the job and must match the client's version anyway. torch is pinned to the lock's
  version, and its build follows the cluster (`torch_index`): the CPU wheel index when the
  cluster has no GPUs, PyPI's CUDA build when it has; --torch cpu|cuda or --torch-index-url
  choose explicitly. `--no-install` (or PIPPO_SUBMIT_INSTALL=0) skips all of it for images
  that already hold the dependencies (faster start, no per-node virtualenv).
- `env_vars` = an allow-list of non-secret settings set here, plus `--env K=V`
  (cluster/job_env.py). Credentials never go in, nor in the entrypoint or metadata: all three
  are stored in the cluster's job table and shown to anyone who lists jobs. Keys, tokens and
  passwords come from the cluster's own environment (instance roles, Kubernetes Secrets);
  credential-looking ARGS, `--env` names and URLs with userinfo are refused.

The submission id is derived from the arguments, the code digest and the runtime_env, so
submitting the same thing twice returns the first job instead of starting a second one.
Token-authenticated clusters (RAY_AUTH_MODE=token): the token is read the way Ray reads it
(RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and sent as a bearer
header; it is never printed.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from cluster import shipping
from cluster.job_env import CredentialError, job_env, refuse_credential_args
from pippo_common.errors import Failed, UserError

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NEVER_PIP = {"ray", "torch"}   # ray: the cluster's; torch: pinned on its own (build choice)


class SubmitError(UserError):
    """Bad input, an unreachable or refusing cluster: one line on stderr, exit 2."""


def cli(func):
    """Wrap a command handler: the errors Ray's job client raises (bare RuntimeError,
    ConnectionError) become SubmitErrors, which the CLI reports like every other UserError
    (pippo_common.errors.report: one redacted line, exit 2); real bugs stay tracebacks."""
    @functools.wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except (UserError, Failed):
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's client raises bare RuntimeError/ConnectionError
            msg = _describe(exc)
            if msg is None:
                raise
            raise SubmitError(msg) from exc
    return run


def _describe(exc: Exception) -> str | None:
    """One line for the errors Ray's job client raises; None for real bugs (traceback)."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if name == "AuthenticationError":
        return "the cluster refused the request: " + ("no token sent" if "required" in text.lower()
                                                      else "the token is wrong") + _TOKEN_HINT
    if isinstance(exc, (RuntimeError, OSError)):   # Ray's client: HTTP errors, connection loss
        if "does not exist" in text:
            return text.split(". ")[0].replace("Request failed with status code 404: ", "")
        return text[:400]
    return None


_TOKEN_HINT = (" (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token, or put it in "
               "~/.ray/auth_token; `ray get-auth-token` on the head prints it)")


# ---- connection ----------------------------------------------------------------------------
def resolve_address(address: str | None) -> str:
    """The dashboard URL from --address or RAY_ADDRESS; `host:port` means http://host:port."""
    addr = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not addr:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in addr:
        addr = "http://" + addr
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"bad cluster address {addr!r}: the Jobs API is the dashboard's "
                          "http(s)://HEAD:8265, not a ray:// or GCS address")
    try:
        parts.port
    except ValueError:
        raise SubmitError(f"bad cluster address {addr!r}: port is not a number") from None
    return addr.rstrip("/")


def auth_headers() -> dict[str, str]:
    """Bearer header for token-auth clusters, found where Ray looks (same precedence)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH: cannot read {path}: {exc.strerror}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH: {path} is empty")
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        if default.is_file():   # like `ray job submit`: a token on disk means token mode
            token = default.read_text().strip()
    if not token:
        if mode == "token":
            raise SubmitError("RAY_AUTH_MODE=token but no token found" + _TOKEN_HINT)
        return {}
    return {"Authorization": f"Bearer {token}"}


def connect(address: str | None):
    """A JobSubmissionClient for the cluster, after a bounded reachability/auth check (Ray's own
    client has no timeout: a black-holed address would hang)."""
    import requests

    url = resolve_address(address)
    headers = auth_headers()
    try:
        r = requests.get(url + "/api/version", headers=headers, timeout=15)
    except requests.RequestException as exc:
        reason = type(exc).__name__.replace("Error", " error").strip()
        raise SubmitError(f"cannot reach the Ray dashboard at {url} ({reason})") from None
    if r.status_code == 401:
        raise SubmitError(f"the cluster at {url} requires a token and none was sent" + _TOKEN_HINT)
    if r.status_code == 403:
        raise SubmitError(f"the cluster at {url} refused the token" + _TOKEN_HINT)
    if r.status_code != 200 or "ray_version" not in r.text:
        raise SubmitError(f"{url} is not a Ray dashboard (GET /api/version answered {r.status_code})")
    from ray.job_submission import JobSubmissionClient
    if not logging.getLogger().isEnabledFor(logging.DEBUG):   # unless -v: Ray's packaging chatter
        logging.getLogger("ray").setLevel(logging.ERROR)      # (set after import: Ray sets it)
    return JobSubmissionClient(url, headers=headers)


def job_info(client, sid: str):
    """The job's details, or None when the cluster has no job with this submission id."""
    try:
        return client.get_job_info(sid)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise


# ---- what a job is made of -----------------------------------------------------------------
def source_root() -> Path:
    """The source tree to ship: the checkout this package runs from."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "pipelines" / "cli" / "__init__.py").is_file():
        raise SubmitError(f"pippo submit ships the source tree, but {root} is not a checkout "
                          "(install the project with `pip install -e .`)")
    return root


def shipped_files(root: Path, args: list[str] = ()) -> list[Path]:
    """The files that travel in working_dir (cluster/shipping.py decides), as paths in `root`."""
    try:
        return [root / f for f in shipping.select(root, list(args)).files]
    except shipping.ShippingError as exc:
        raise SubmitError(str(exc)) from None


def code_digest(selection: shipping.Selection) -> str:
    h = hashlib.sha256()
    for rel in selection.files:
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256((selection.root / rel).read_bytes()).digest())
    return h.hexdigest()


def read_lock(root: Path) -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (root / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = ver.split(";")[0].strip()
    return pins


def pinned_requirements(root: Path) -> list[str]:
    """The runtime dependency closure of the package (no `test` extra), pinned to the lock.

    The direct requirements are the shipped pyproject.toml's (what the job will run); the rest
    of the closure is walked through the installed distributions' metadata, markers evaluated
    for this machine (submit from the platform the cluster runs, or use --no-install with a
    prepared image). Into `ray` only its extras' requirements (data, train, default): Ray's
    core dependencies come with the cluster's Ray."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = read_lock(root)
    names: set[str] = set()
    stack: list[tuple[str, frozenset]] = [("", frozenset())]    # "" = the shipped project
    seen = set()
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = (tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
                        if not name else md.distribution(name).requires or [])
        except md.PackageNotFoundError:
            raise SubmitError(f"cannot pin the job's dependencies: {name} is not installed here "
                              "(run scripts/setup.sh, or submit with --no-install)") from None
        for line in requires:
            req = Requirement(line)
            marker = req.marker
            if marker and not any(marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            if name == "ray" and (marker is None or marker.evaluate({"extra": ""})):
                continue            # a core Ray dependency: the cluster's Ray brings it
            dep = canonicalize_name(req.name)
            names.add(dep)
            if dep != "torch":      # torch's CUDA/CPU dependencies are pip's to resolve there
                stack.append((dep, frozenset(req.extras)))
    missing = sorted(n for n in names - {"ray"} if n not in pins)
    if missing:
        raise SubmitError(f"requirements.lock does not pin {', '.join(missing)}")
    return [f"{n}=={pins[n]}" for n in sorted(names - NEVER_PIP)] + [f"torch=={pins['torch']}"]


def torch_index(args, cluster_gpus: bool | None) -> tuple[str | None, str]:
    """The extra pip index for torch (None: PyPI's, a CUDA build on Linux) and why.

    What a Ray user expects: the build the cluster can use, and no multi-GB CUDA wheels on a
    CPU-only cluster. An explicit --torch-index-url or --torch cpu|cuda wins; `auto` installs
    the CUDA build when the cluster has GPUs now or the driver asks for some
    (--entrypoint-num-gpus), the same rule `pippo train` uses to decide use_gpu, else the CPU
    build. A cluster whose GPU workers start on demand shows no GPUs yet: --torch cuda."""
    if args.torch_index_url:
        return args.torch_index_url, "--torch-index-url"
    choice = getattr(args, "torch", None) or "auto"
    if choice == "auto":
        if (getattr(args, "entrypoint_num_gpus", None) or 0) > 0:
            choice, why = "cuda", "--entrypoint-num-gpus asks for GPUs"
        elif cluster_gpus is None:
            choice, why = "cuda", "could not tell whether the cluster has GPUs (--torch cpu for a CPU cluster)"
        else:
            choice, why = ("cuda", "the cluster has GPUs") if cluster_gpus else (
                "cpu", "the cluster has no GPUs now (--torch cuda if GPU workers start on demand)")
    else:
        why = f"--torch {choice}"
    return (None if choice == "cuda" else CPU_TORCH_INDEX), f"{choice} build: {why}"


def _torch_auto(args) -> bool:
    """True when the torch build depends on the cluster's answer (see torch_index)."""
    return (not args.torch_index_url and (getattr(args, "torch", None) or "auto") == "auto"
            and not (getattr(args, "entrypoint_num_gpus", None) or 0) > 0)


def cluster_has_gpus(url: str, headers: dict) -> bool | None:
    """Whether any live node of the cluster offers GPUs (the state API behind `ray list nodes`);
    None when the dashboard does not say."""
    import requests

    try:
        r = requests.get(url + "/api/v0/nodes", params={"limit": 10000}, headers=headers, timeout=15)
        nodes = r.json()["data"]["result"]["result"] if r.status_code == 200 else None
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None
    if not isinstance(nodes, list):
        return None
    return any(isinstance(n, dict) and n.get("state") == "ALIVE"
               and float((n.get("resources_total") or {}).get("GPU", 0) or 0) > 0 for n in nodes)


def build_job(args, root: Path, cluster_gpus: bool | None = None) -> dict:
    """The keyword arguments of JobSubmissionClient.submit_job, less working_dir."""
    return plan_job(args, root, cluster_gpus)[0]


def plan_job(args, root: Path, cluster_gpus: bool | None = None,
             selection: shipping.Selection | None = None):
    """Everything that defines the job: (submit_job kwargs with a runtime_env still without
    working_dir, which is the staging copy made at submission; the file selection; the torch
    build and why). Refuses credentials in ARGS and the environment before anything else."""
    pippo_args = list(args.args or [])
    if pippo_args[:1] == ["--"]:
        pippo_args = pippo_args[1:]
    if not pippo_args:
        raise SubmitError("nothing to run: pippo submit [OPTIONS] -- COMMAND ARGS "
                          "(e.g. pippo submit -- pipeline run configs/pipelines/demo.yaml)")
    if pippo_args[0] in ("submit", "jobs"):
        raise SubmitError(f"`pippo {pippo_args[0]}` talks to a cluster; run it here, not as a job")
    for flag in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
        if (getattr(args, flag, None) or 0) < 0:
            raise SubmitError(f"--{flag.replace('_', '-')} must be >= 0")
    try:
        refuse_credential_args(pippo_args)
        env = job_env(args.env or [])
        selection = selection or shipping.select(root, pippo_args)
    except (CredentialError, shipping.ShippingError) as exc:
        raise SubmitError(str(exc)) from None
    install = not args.no_install and os.environ.get("PIPPO_SUBMIT_INSTALL", "1").lower() not in (
        "0", "false", "no")
    runtime_env: dict = {}
    if env:
        runtime_env["env_vars"] = env
    torch_note = None
    if install:
        pip: dict = {"packages": pinned_requirements(root), "pip_check": False}
        index, torch_note = torch_index(args, cluster_gpus)
        if index:
            pip["pip_install_options"] = ["--disable-pip-version-check", "--no-cache-dir",
                                          "--extra-index-url", index]
        runtime_env["pip"] = pip
    code = code_digest(selection)
    entrypoint = "python -m pipelines.cli " + shlex.join(pippo_args)
    resources = {k: v for k in ("entrypoint_num_cpus", "entrypoint_num_gpus")
                 if (v := getattr(args, k, None)) is not None}
    blob = json.dumps({"args": pippo_args, "code": code, "runtime_env": runtime_env,
                       "resources": resources}, sort_keys=True)
    sid = args.submission_id or default_submission_id(pippo_args, blob)
    metadata = {"pippo.args": shlex.join(pippo_args), "pippo.code": code[:16]}
    job = {"entrypoint": entrypoint, "runtime_env": runtime_env, "submission_id": sid,
           "metadata": metadata, **resources}
    return job, selection, torch_note


def default_submission_id(pippo_args: list[str], blob: str) -> str:
    """`pippo-<command words>-<digest>`: readable in `jobs list`, equal for equal jobs."""
    words = [a for a in pippo_args[:3] if re.fullmatch(r"[a-z][a-z-]*", a)][:2]
    return "-".join(["pippo", *words, hashlib.sha256(blob.encode()).hexdigest()[:16]])


# ---- following a job -----------------------------------------------------------------------
def follow(client, sid: str, stream) -> str:
    """Stream the job's logs to `stream` until it ends; returns the final status. Falls back to
    polling when the websocket tail is unavailable (some proxies) or drops."""
    written = 0

    async def tail():
        nonlocal written
        async for chunk in client.tail_job_logs(sid):
            stream.write(chunk)
            stream.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - any tail failure: carry on by polling
        pass
    while True:
        status = status_of(client.get_job_info(sid))
        logs = client.get_job_logs(sid)
        if len(logs) > written:
            stream.write(logs[written:])
            stream.flush()
            written = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(1.0)


def status_of(info) -> str:
    s = info.status
    return str(getattr(s, "value", s))


def exit_code(client, sid: str, status: str) -> int:
    """0 on SUCCEEDED; 1 (with the job's message on stderr) on FAILED or STOPPED."""
    if status == "SUCCEEDED":
        return 0
    info = job_info(client, sid)
    message = (getattr(info, "message", None) or "").split(", last available logs")[0]
    message = " ".join(message.split())[:300]
    print(f"pippo: job {sid} {status}" + (f": {message}" if message else ""), file=sys.stderr)
    return 1


# ---- the command -----------------------------------------------------------------------------
def dry_run(args, job: dict, sel: shipping.Selection, torch_note: str | None) -> int:
    """--dry-run: what would travel, on stdout; nothing is staged, uploaded or submitted, and
    no cluster is contacted (so an `auto` torch build is named as the rule, not the result)."""
    for rel in sel.files:
        print(f"{(sel.root / rel).stat().st_size:>10}  {rel}")
    total = sel.total_bytes
    print(f"{len(sel.files)} files, {total} bytes ({shipping.human_size(total)}) from {sel.root} "
          f"({'git-tracked files' if sel.source == 'git' else 'the package source list'})")
    print(f"pippo: entrypoint: {job['entrypoint']}", file=sys.stderr)
    env = sorted(job["runtime_env"].get("env_vars", {}))
    print(f"pippo: forwarded environment: {', '.join(env) or '(none)'}", file=sys.stderr)
    if torch_note and _torch_auto(args):
        torch_note = "auto: the CUDA build if the cluster has GPUs at submission, else the CPU build"
    if torch_note:
        print(f"pippo: torch: {torch_note}", file=sys.stderr)
    return 0


def _withheld_note(sel: shipping.Selection, limit: int | None = 8) -> None:
    """Names (never contents) of the credential-shaped files left out: the user may want them
    out of the tree, or out of git."""
    if sel.withheld:
        names = ", ".join(sel.withheld[:limit]) + (" ..." if limit and len(sel.withheld) > limit else "")
        print(f"pippo: note: not shipping {len(sel.withheld)} credential-shaped file(s): {names}",
              file=sys.stderr)


@cli
def main(args) -> int:
    """pippo submit: submit (or find) the job, print its id last on stdout; --wait follows it."""
    root = source_root()
    job, selection, torch_note = plan_job(args, root)   # before connecting: bad input fails offline
    _withheld_note(selection, None if getattr(args, "dry_run", False) else 8)
    if getattr(args, "dry_run", False):
        return dry_run(args, job, selection, torch_note)
    client = connect(args.address)
    if "pip" in job["runtime_env"] and _torch_auto(args):      # ask the cluster
        gpus = cluster_has_gpus(resolve_address(args.address), auth_headers())
        job, selection, torch_note = plan_job(args, root, gpus, selection)
    if torch_note:
        print(f"pippo: torch: {torch_note}", file=sys.stderr)
    sid = job["submission_id"]
    info = job_info(client, sid)
    if info is not None and args.retry and status_of(info) in ("FAILED", "STOPPED"):
        print(f"pippo: job {sid} {status_of(info)}: submitting it again (--retry)", file=sys.stderr)
        client.delete_job(sid)
        info = None
    if info is None:
        try:
            # Ray zips and uploads working_dir inside submit_job: the staging copy can go after.
            with shipping.staged(selection) as stage:
                job["runtime_env"]["working_dir"] = str(stage)
                client.submit_job(**job)
            print(f"pippo: submitted {sid} to {client.get_address()}", file=sys.stderr)
        except shipping.ShippingError as exc:
            raise SubmitError(str(exc)) from None
        except RuntimeError as exc:
            if "already" not in str(exc):
                raise
            # a concurrent submission of the same job got there first: that one is ours too
            print(f"pippo: {sid} was just submitted by someone else; following that one",
                  file=sys.stderr)
    else:
        print(f"pippo: {sid} already submitted ({status_of(info)}); not starting it again"
              + ("; --retry reruns a failed one" if status_of(info) in ("FAILED", "STOPPED") else ""),
              file=sys.stderr)
    print(sid, flush=True)
    if not args.wait:
        return 0
    try:
        status = follow(client, sid, sys.stderr)
    except KeyboardInterrupt:
        print(f"pippo: stopped following; the job keeps running (pippo jobs logs {sid} --follow)",
              file=sys.stderr)
        return 130
    return exit_code(client, sid, status)
