"""`pippo submit`: run `pippo ARGS...` as a Ray job through the Jobs API.

What travels with a job (its runtime_env):
- `working_dir` = this source tree (minus .venv, .git, .pippo, out, caches and files that
  usually hold credentials), so the cluster runs exactly the code that was submitted. The
  entrypoint is `python -m pipelines.cli ARGS` inside that directory, i.e. `pippo ARGS` of the
  uploaded code whether or not the cluster's image has the package installed.
- `pip` = the package's runtime dependencies pinned to requirements.lock (DEFAULT), so a stock
  Ray image needs nothing pre-installed; Ray builds one virtualenv per distinct list per node
  and caches it, and pins the image already satisfies are not reinstalled (the virtualenv sees
  the image's site-packages). `ray` itself is never listed: the cluster's Ray is the one that
  runs the job and must match the client's version anyway. torch is pinned to the lock's
  version; plain PyPI gives the CUDA build on Linux (right for GPU clusters),
  `--torch-index-url https://download.pytorch.org/whl/cpu` (or .../cu128) picks another build.
  `--no-install` (or PIPPO_SUBMIT_INSTALL=0) skips all of it for images that already hold the
  dependencies (faster start, no per-node virtualenv).
- `env_vars` = the non-secret settings the job needs if they are set here: PIPPO_STORE,
  MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION, plus `--env K=V`.
  Credentials never go in: a runtime_env is stored in the cluster's job table and shown to
  anyone who lists jobs. Keys, tokens and passwords come from the cluster's own environment
  (instance roles, Kubernetes Secrets); a secret-looking `--env` name or a URL with a password
  is refused.

The submission id is derived from the arguments, the code digest and the runtime_env, so
submitting the same thing twice returns the first job instead of starting a second one.
Token-authenticated clusters (RAY_AUTH_MODE=token): the token is read the way Ray reads it
(RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and sent as a bearer
header; it is never printed.
"""
from __future__ import annotations

import asyncio
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

FORWARD_ENV = ("PIPPO_STORE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
# Directories never shipped; `ROOT_ONLY` ones only at the top of the tree (gitignore `/x`).
SKIP_DIRS = {".venv", ".git", ".pippo", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
ROOT_ONLY = {"out", "build"}
# Files that usually hold credentials: a working_dir is readable by every job on the cluster.
SKIP_FILES = (".env", ".env.*", "*.pem", "*.key", "*.pyc", ".netrc")
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|SESSION_KEY", re.I)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NEVER_PIP = {"ray", "torch"}   # ray: the cluster's; torch: pinned on its own (build choice)


class SubmitError(Exception):
    """Bad input, an unreachable or refusing cluster: one line on stderr, exit 2."""


def cli(func):
    """Wrap a command handler: every failure a user can cause or meet ends as one line, exit 2."""
    def run(args) -> int:
        try:
            return func(args)
        except SubmitError as exc:
            msg = str(exc)
        except Exception as exc:  # noqa: BLE001 - Ray's client raises bare RuntimeError/ConnectionError
            msg = _describe(exc)
            if msg is None:
                raise
        print(f"pippo: error: {msg}", file=sys.stderr)
        return 2
    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
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
    if not (root / "pyproject.toml").is_file() or not (root / "pipelines" / "cli.py").is_file():
        raise SubmitError(f"pippo submit ships the source tree, but {root} is not a checkout "
                          "(install the project with `pip install -e .`)")
    return root


def ray_excludes() -> list[str]:
    """The same exclusions as `shipped_files`, as gitignore patterns for Ray's packager."""
    return sorted(SKIP_DIRS) + [f"/{d}" for d in sorted(ROOT_ONLY)] + ["*.egg-info", *SKIP_FILES]


def shipped_files(root: Path) -> list[Path]:
    """The files that travel in working_dir, sorted (Ray also honours .gitignore, which lists
    the same directories; anything extra here only makes the digest more conservative)."""
    from fnmatch import fnmatch

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
                             and not (top and d in ROOT_ONLY))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not any(fnmatch(f, pat) for pat in SKIP_FILES) and p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def code_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in shipped_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
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


def job_env(extra: list[str]) -> dict[str, str]:
    """Non-secret settings forwarded into the job; refuses anything that looks like a secret."""
    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SubmitError(f"--env {item.split('=')[0]!r}: expected KEY=VALUE")
        env[key] = value
    for key, value in env.items():
        if SECRET_NAME.search(key):
            raise SubmitError(f"--env {key}: secrets never travel with a job (the runtime_env is "
                              "visible to everyone on the cluster); give the cluster its own")
        if "://" in value and urlsplit(value).password:
            raise SubmitError(f"{key} holds a URL with a password; set the credentials on the "
                              "cluster (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD from a Secret)")
        if key == "PIPPO_STORE" and "://" not in value and not os.path.isabs(value):
            print(f"pippo: note: PIPPO_STORE={value} is relative: on the cluster it lands in the "
                  "job's working directory, which is deleted with the job", file=sys.stderr)
    return env


def build_job(args, root: Path) -> dict:
    """Everything that defines the job: entrypoint, runtime_env, resources, metadata."""
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
    install = not args.no_install and os.environ.get("PIPPO_SUBMIT_INSTALL", "1").lower() not in (
        "0", "false", "no")
    runtime_env: dict = {"working_dir": str(root), "excludes": ray_excludes()}
    env = job_env(args.env or [])
    if env:
        runtime_env["env_vars"] = env
    if install:
        pip: dict = {"packages": pinned_requirements(root), "pip_check": False}
        if args.torch_index_url:
            pip["pip_install_options"] = ["--disable-pip-version-check", "--no-cache-dir",
                                          "--extra-index-url", args.torch_index_url]
        runtime_env["pip"] = pip
    code = code_digest(root)
    entrypoint = "python -m pipelines.cli " + shlex.join(pippo_args)
    resources = {k: v for k in ("entrypoint_num_cpus", "entrypoint_num_gpus")
                 if (v := getattr(args, k, None)) is not None}
    identity = {k: v for k, v in runtime_env.items() if k != "working_dir"}
    blob = json.dumps({"args": pippo_args, "code": code, "runtime_env": identity,
                       "resources": resources}, sort_keys=True)
    sid = args.submission_id or default_submission_id(pippo_args, blob)
    metadata = {"pippo.args": shlex.join(pippo_args), "pippo.code": code[:16]}
    return {"entrypoint": entrypoint, "runtime_env": runtime_env, "submission_id": sid,
            "metadata": metadata, **resources}


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
@cli
def main(args) -> int:
    """pippo submit: submit (or find) the job, print its id last on stdout; --wait follows it."""
    root = source_root()
    job = build_job(args, root)   # before connecting: bad input fails fast and offline
    client = connect(args.address)
    sid = job["submission_id"]
    info = job_info(client, sid)
    if info is not None and args.retry and status_of(info) in ("FAILED", "STOPPED"):
        print(f"pippo: job {sid} {status_of(info)}: submitting it again (--retry)", file=sys.stderr)
        client.delete_job(sid)
        info = None
    if info is None:
        try:
            client.submit_job(**job)
            print(f"pippo: submitted {sid} to {client.get_address()}", file=sys.stderr)
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
