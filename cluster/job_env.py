"""What of this machine's environment and command line may travel with a job.

A job's entrypoint, metadata and runtime_env (env_vars included) are stored in the cluster's job
table and shown to anyone who can list jobs (`ray job list`, the dashboard, `pippo jobs list`),
and the entrypoint lands in the job's logs. So:

- environment variables are forwarded from an explicit ALLOW-list of non-secret settings, never
  by filtering names (OPENAI_KEY, HF_AUTH, DB_PWD, GITHUB_PAT, WANDB_KEY... all slip past a
  name filter); a forwarded value that carries credentials (`https://user:pw@host`,
  `https://TOKEN@host`, `?token=...`) is refused, not forwarded;
- `--env K=V` adds a setting the user names; a secret-looking name or value is refused;
- ARGS that carry a credential (a URL with userinfo or a secret query parameter, a secret-named
  `key=value` override, `--password X`) are refused before anything is submitted.

Keys, tokens and passwords reach the job from the cluster's own environment: instance roles /
workload identity, or variables the nodes export before `ray start` (docs/cluster.md).
"""
from __future__ import annotations

import os
import re
import sys

from pippo_common.errors import UserError
from pippo_common.redact import has_credentials, is_secret_name, strip_credentials

# Settings a job needs that are never secret. Deliberately absent: RAY_* (the job's driver gets
# its address and token from the cluster; forwarding RAY_ADDRESS/RAY_AUTH_TOKEN would be wrong or
# a leak), AWS_PROFILE (names a file on this machine), MLFLOW_TRACKING_USERNAME (half a credential).
FORWARD_ENV = ("PIPPO_STORE", "PIPPO_VERBOSITY", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
               "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# For `--env` names only, stricter than the project's config-key rule (pippo_common.redact, where a
# bare "key" or "auth" suffix is ambiguous): an environment variable ending in KEY, PAT, PWD,
# PASS, AUTH or CERT is a credential far more often than not.
SECRET_ENV_NAME = re.compile(
    r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|SESSION|COOKIE|"
    r"(?:^|_)(?:KEY|PAT|PWD|PASS|AUTH|CERT|DSN|SIG|SIGNATURE)(?:_|$)", re.I)
# For override keys and flags: the project's rule plus the suffixes API keys are named with.
SECRET_SUFFIX = re.compile(r"(?:^|[_.\-])(?:key|pat|pwd|pass|passwd|auth)$", re.I)
SECRET_FLAG = re.compile(r"^--?([\w.\-]+)(?:=(.*))?$", re.S)
URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.\-]*://[^\s'\"]+")
ENV_REF = re.compile(r"^\$\{\w+\}$")                     # a reference the cluster resolves


class CredentialError(UserError):
    """A credential would leave this machine with the job (one line; the value never in it)."""


def carries_credentials(value: str) -> bool:
    """A URL in `value` with userinfo (user:pw@ or TOKEN@) or a secret query parameter."""
    return any(has_credentials(u) or strip_credentials(u) != u for u in URL_IN_TEXT.findall(value))


def _secret_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return is_secret_name(key) or is_secret_name(last) or bool(SECRET_SUFFIX.search(last))


def refuse_credential_args(args: list[str]) -> None:
    """Raise CredentialError for the first ARG that carries a credential; says which ARG by
    position and kind, never its value."""
    expect_value_of = None
    for i, arg in enumerate(args, 1):
        if expect_value_of is not None:
            if not arg.startswith("-") and not ENV_REF.match(arg):
                raise CredentialError(f"argument {i} is the value of {expect_value_of}: credentials "
                                      "never travel in a job's command line (it is shown to anyone "
                                      "who lists jobs); let the cluster's environment supply them")
            expect_value_of = None
        if carries_credentials(arg):
            raise CredentialError(f"argument {i} holds a URL with credentials (user:password@, "
                                  "TOKEN@ or a secret query parameter): a job's command line is "
                                  "shown to anyone who lists jobs; give the cluster its credentials")
        flag = SECRET_FLAG.match(arg) if arg.startswith("-") else None
        if flag and _secret_key(flag.group(1)):
            if flag.group(2) is None:
                expect_value_of = "--" + flag.group(1)
            elif flag.group(2) and not ENV_REF.match(flag.group(2)):
                raise CredentialError(f"argument {i} (--{flag.group(1)}=...) is a credential: "
                                      "credentials never travel in a job's command line")
            continue
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and value and not ENV_REF.match(value) and _secret_key(key):
            raise CredentialError(f"argument {i} sets {key}, a credential: a job's command line is "
                                  "shown to anyone who lists jobs; put the credential in the "
                                  "cluster's environment and reference it as ${VAR} in the config")
    if expect_value_of is not None:
        raise CredentialError(f"{expect_value_of} takes a credential: credentials never travel in "
                              "a job's command line")


def job_env(extra: list[str]) -> dict[str, str]:
    """The allow-listed settings set here, plus `--env K=V`; refuses anything secret."""
    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    named = set()
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not ENV_NAME.fullmatch(key):
            raise CredentialError(f"--env {item.split('=')[0]!r}: expected KEY=VALUE")
        if is_secret_name(key) or SECRET_ENV_NAME.search(key):
            raise CredentialError(f"--env {key}: secrets never travel with a job (the runtime_env is "
                                  "visible to everyone on the cluster); give the cluster its own")
        env[key] = value
        named.add(key)
    for key, value in env.items():
        if carries_credentials(value):
            where = "--env" if key in named else "the environment"
            raise CredentialError(f"{key} (from {where}) holds a URL with credentials; set them on "
                                  "the cluster (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD from a Secret)")
        if key == "PIPPO_STORE" and "://" not in value and not os.path.isabs(value):
            print(f"pippo: note: PIPPO_STORE={value} is relative: on the cluster it lands in the "
                  "job's working directory, which is deleted with the job", file=sys.stderr)
    return env
