"""The project's one redactor: credentials are never stored, logged or printed.

Three kinds of secret reach us: userinfo in URLs (`https://user:pw@host/...`, `s3://KEY:SECRET@b`),
secret-named query parameters (`?token=...`, presigned `X-Amz-Signature=...`), and the values of
secret-named environment variables (`${HF_TOKEN}`, `$AWS_SECRET_ACCESS_KEY`), whether a config
expanded them or a library echoes them.

Only secrets are redacted: keys, tokens, passwords, signatures. Identifiers are not — an access key
id (AWS_ACCESS_KEY_ID, an s3 `access_key`), a bucket, a user name alone — so a record that stores
`s3://my-bucket/ds` keeps it even when the access key id happens to equal `my-bucket`.

    strip_credentials(url)   an input id / ledger URL without its credentials; pure and
                             deterministic (a Ray worker computes the same id as the driver)
    redact_text(text)        a log line, error message or output line: the above, `password=...`
                             pairs and every secret value (registered, or in a secret-named env var)
    redact(tree)             a config / record / MLflow payload fit to store: strings redacted
                             (expanded secret `${VAR}` values back to `${VAR}`), secret-named keys
                             masked; redact_config is the same function
    register_secret(value)   a value never to print (pippo_common.config registers what a secret-named
                             `${VAR}` expanded to; the CLI registers URL userinfo of its arguments)
    check_not_secret(v, w)   names and paths (tags, run names, run dirs) never derive from a secret
    RedactingStream          sys.stdout/sys.stderr of the CLI and of Ray workers (print() output)

Worker processes do not see the driver's registrations, but they inherit its environment: the
env-derived part of the secret set is recomputed there on every call.
"""
from __future__ import annotations

import os
import re
import threading

MASK = "***"
MIN_SECRET_LEN = 4          # shorter registered values would mangle unrelated text
MIN_ENV_SECRET_LEN = 8      # secret-named environment variables (AWS_SECRET_ACCESS_KEY, ...)

# Names whose values are credentials. "token" only as a whole word (max_tokens/tokenizer are
# config) and "key" only as a whole name/segment (s3fs's storage_options.key, not sort_key).
# A bare `key` stays masked in configs: too many APIs call their secret just "key".
_SECRET_NAME = re.compile(
    r"secret|passw|pwd$|credential|signature|private[_-]?key|api[_-]?key|apikey|session[_-]?key|"
    r"(?:^|[_.\-])(?:token|sig|auth)$|(?:^|[_.\-])token[_.\-]|(?:^|\.)key$",
    re.IGNORECASE)
# Identifiers that look secret-named: AWS_ACCESS_KEY_ID, access_key_id, client_id, key_id.
_IDENTIFIER_NAME = re.compile(r"(?:^|[_.\-])id$", re.IGNORECASE)
_NOT_IDENTIFIER = re.compile(r"secret|passw|token", re.IGNORECASE)
# Environment variables name secrets more tersely than configs do: OPENAI_KEY, WANDB_KEY,
# GITHUB_PAT, DB_PASS, MY_CREDS.
_SECRET_ENV_NAME = re.compile(r"(?:^|_)(?:KEY|PAT|PASS|CREDS?|APIKEY)$", re.IGNORECASE)
_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})    # "pwd$" is for passwords, not directories

# scheme://user:pw@host. A password may hold "/" (AWS secret keys do), a user name may not. The
# authority ends at the first "/" (RFC 3986), so "https://host:8080/a@b" has a port and a path
# with "@", no userinfo: a ":digits" followed by "/", "?", "#" or the end is a port. A user name
# never holds "[" (RFC 3986): `http://[::1]:8080/x@y` is an IPv6 host, not `[` : `:1]...`.
_USERINFO = re.compile(r"([a-zA-Z][\w+.\-]*://)((?:[^/@\s?#:'\"\[\]]+:(?!\d+(?:[/?#\s'\"]|$))[^@\s'\"]*?"
                       r"|[^/@\s?#:'\"\[\]]+))@")
_QUERY = re.compile(r"([?&;])([^=&#\s]+)=([^&#\s'\"]*)")                       # ?token=abc&...
_ASSIGN = re.compile(r"""([\w.\-]+)(["']?[ \t]*[:=][ \t]*["']?)([^\s,;'"}\]]+)""")  # key: xyz
_ENV_REF = re.compile(r"^\$\{\w+(?::-[^}]*)?\}$")

_lock = threading.Lock()
_registered: dict[str, str] = {}     # secret value -> what to print instead


def is_secret_name(name: str) -> bool:
    """True for a config key or variable name whose value is a secret (not an identifier)."""
    name = str(name)
    if not _SECRET_NAME.search(name):
        return False
    return not (_IDENTIFIER_NAME.search(name) and not _NOT_IDENTIFIER.search(name))


def is_secret_env_name(name: str) -> bool:
    """True for an environment variable whose value is a secret: the config rule plus the terse
    names of env vars (`OPENAI_KEY`, `GITHUB_PAT`); never PWD/OLDPWD or an `..._ID`."""
    name = str(name)
    if name in _NOT_SECRET_ENV:
        return False
    if is_secret_name(name):
        return True
    return bool(_SECRET_ENV_NAME.search(name)) and not _IDENTIFIER_NAME.search(name)


def register_secret(value: str, replacement: str = MASK) -> None:
    """Never print or store `value` again in this process: redact_text/redact replace it by
    `replacement` (e.g. "${TOKEN}", the reference it was expanded from)."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LEN:
        with _lock:
            if replacement != MASK or value not in _registered:    # keep the more telling "${NAME}"
                _registered[value] = replacement


def register_url_credentials(text: str) -> None:
    """Register the userinfo of every URL in `text` (and its password alone): some libraries
    echo a URL's authority without its scheme (botocore: 'Invalid bucket name "KEY:SECRET@b"')."""
    for m in _USERINFO.finditer(str(text)):
        userinfo = m.group(2)      # `user:pw`, or a lone user that is often a token (`TOKEN@github.com`)
        register_secret(userinfo, MASK)
        user, sep, password = userinfo.partition(":")
        if sep:
            register_secret(password, MASK)


def has_credentials(url: str) -> bool:
    """True if `url` carries userinfo (user:password@ or user@)."""
    return bool(_USERINFO.match(str(url).strip()))


def _query(m: re.Match, mask: str) -> str:
    name, value = m.group(2), m.group(3)
    if not is_secret_name(name) or not value or _ENV_REF.match(value):
        return m.group(0)
    return f"{m.group(1)}{name}={mask}"


def strip_credentials(url: str) -> str:
    """`url` without credentials: userinfo removed (`https://u:p@h/x` -> `https://h/x`) and the
    values of secret-named query parameters masked (`?token=***`). Pure: the same URL gives the
    same result in every process, so it can name inputs (ids, ledgers, markers, sample JSON)."""
    url = str(url)
    url = _USERINFO.sub(r"\1", url)
    return _QUERY.sub(lambda m: _query(m, MASK), url)


def env_secrets() -> dict[str, str]:
    """{value: "${NAME}"} of every secret-named environment variable: recomputed on each call, so
    a Ray worker (which inherits the environment, not the driver's registrations) knows them."""
    return {v: f"${{{k}}}" for k, v in os.environ.items()
            if len(v) >= MIN_ENV_SECRET_LEN and is_secret_env_name(k)}


def _secret_table() -> dict[str, str]:
    with _lock:
        return {**env_secrets(), **_registered}


def _replace_secrets(text: str) -> str:
    table = _secret_table()
    for value in sorted(table, key=len, reverse=True):      # longest first: no partial leftovers
        if value in text:
            text = text.replace(value, table[value])
    return text


def redact_text(text) -> str:
    """A log line, error message or output line fit to print: no URL userinfo, secret query
    values, `password=...` values, or secret values (registered or from the environment)."""
    s = _replace_secrets(str(text))
    s = _USERINFO.sub(rf"\1{MASK}@", s)
    s = _QUERY.sub(lambda m: _query(m, MASK), s)
    # URLs are already clean, so a match that swallows one ("https" + "://...") loses nothing.
    return _ASSIGN.sub(_assignment, s)


def _assignment(m: re.Match) -> str:
    if is_secret_name(m[1]):
        return m[0] if _ENV_REF.match(m[3]) else f"{m[1]}{m[2]}{MASK}"
    # not a secret name, but its value may start with a pair: "ValueError: password=x" matches
    # as key "ValueError" and value "password=x", which must be looked at again (the value
    # class is the same, so the inner pair runs to the end of the outer value)
    inner = _ASSIGN.match(m[3])
    return m[0] if inner is None else f"{m[1]}{m[2]}{_assignment(inner)}{m[3][inner.end():]}"


def _blank(v) -> bool:
    return v is None or isinstance(v, bool) or (isinstance(v, str) and not v)


def redact(value, key: str | None = None):
    """A copy of a config tree (or any JSON-like value) fit to store or log: the values of secret
    `${VAR}`s go back to `${VAR}`, URL credentials and secret query values are removed, and the
    whole value of a secret-named key is masked. Identifiers (ids, buckets) are kept."""
    if key is not None and is_secret_name(key) and not _blank(value):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


redact_config = redact


def derives_from_secret(text) -> bool:
    """True if `text` holds a secret value (registered, or of a secret-named env variable)."""
    text = str(text)
    return any(value in text for value in _secret_table())


def check_not_secret(value, what: str) -> None:
    """Names and paths (tags, run names, run dirs) never derive from a secret: a path would show
    it to anyone who lists the store. Raises ValueError naming only the redacted form."""
    # URL userinfo is not part of a path, and storage refuses it with its own clearer line
    if value is not None and derives_from_secret(strip_credentials(value)):
        raise ValueError(f"{what} {redact_text(value)!r} comes from a secret; names and paths never "
                         "hold a secret (use a plain name)")


class RedactingStream:
    """A text stream (sys.stdout/sys.stderr) whose writes are redacted: print() output of the
    CLI's result lines, Ray's forwarded worker lines, and libraries that print (DeepSpeed).
    Everything else is the wrapped stream's (fileno, buffer, encoding...)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text) -> int:
        self._stream.write(redact_text(text) if text else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def redacting(stream):
    """`stream` wrapped once (wrapping a wrapper again would only redact twice)."""
    return stream if isinstance(stream, RedactingStream) else RedactingStream(stream)
