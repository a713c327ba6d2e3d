"""Credentials are never stored or printed.

Three kinds of secret reach us: userinfo in URLs (`https://user:pw@host/...`, `s3://KEY:SECRET@b`),
secret-named query parameters (`?token=...`, presigned `X-Amz-Signature=...`), and the values of
`${VAR}` references a config expanded (`uri: https://host/list.txt?sig=${TOKEN}`).

    strip_credentials(url)   an input id / ledger URL without its credentials; pure and
                             deterministic (a Ray worker computes the same id as the driver)
    redact_text(text)        a log line or error message: the above, plus `password=...` pairs,
                             AWS access key ids, and every registered secret value
    redact_config(tree)      a config for the version record: strings redacted, expanded `${VAR}`
                             values put back as `${VAR}`, secret-named keys masked
    register_secret(value)   a value never to print (pipelines.config registers what `${VAR}`
                             expanded to; the CLI registers URL userinfo of its arguments)
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
# Kept equal to pipelines.training.tracking's rules.
_SECRET_NAME = re.compile(
    r"secret|passw|pwd$|credential|signature|private[_-]?key|access[_-]?key|api[_-]?key|"
    r"apikey|session[_-]?key|(?:^|[_.\-])(?:token|sig|auth)$|(?:^|[_.\-])token[_.\-]|(?:^|\.)key$",
    re.IGNORECASE)
# scheme://user:pw@host; a password may hold "/" (AWS secret keys do), a user name may not; a
# port ("host:8080/a@b") is not a password.
_USERINFO = re.compile(r"([a-zA-Z][\w+.\-]*://)((?:[^/@\s?#:'\"]+:(?!\d+(?:[/?#\s'\"]|$))[^@\s'\"]*?"
                       r"|[^/@\s?#:'\"]+))@")
_QUERY = re.compile(r"([?&;])([^=&#\s]+)=([^&#\s'\"]*)")                       # ?token=abc&...
_ASSIGN = re.compile(r"""([\w.\-]+)(["']?[ \t]*[:=][ \t]*["']?)([^\s,;'"}\]]+)""")  # key: xyz
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_ENV_REF = re.compile(r"^\$\{\w+(?::-[^}]*)?\}$")

_lock = threading.Lock()
_registered: dict[str, str] = {}     # secret value -> what to print instead


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def register_secret(value: str, replacement: str = MASK) -> None:
    """Never print or store `value` again in this process: redact_text/redact_config replace it
    by `replacement` (e.g. "${TOKEN}", the reference it was expanded from)."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _registered[value] = replacement


def register_url_credentials(text: str) -> None:
    """Register the userinfo of every URL in `text` (and its password alone): some libraries
    echo a URL's authority without its scheme (botocore: 'Invalid bucket name "KEY:SECRET@b"')."""
    for m in _USERINFO.finditer(str(text)):
        userinfo = m.group(2)
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


_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})    # "pwd$" is for passwords, not directories


def _env_secrets() -> dict[str, str]:
    return {v: f"${{{k}}}" for k, v in os.environ.items()
            if is_secret_name(k) and k not in _NOT_SECRET_ENV and len(v) >= MIN_ENV_SECRET_LEN}


def _replace_registered(text: str) -> str:
    with _lock:
        table = {**_env_secrets(), **_registered}
    for value in sorted(table, key=len, reverse=True):      # longest first: no partial leftovers
        if value in text:
            text = text.replace(value, table[value])
    return text


def redact_text(text) -> str:
    """A log line or error message fit to print: no URL userinfo, secret query values,
    `password=...` values, AWS access key ids, or registered secret values."""
    s = _replace_registered(str(text))
    s = _USERINFO.sub(rf"\1{MASK}@", s)
    s = _QUERY.sub(lambda m: _query(m, MASK), s)
    # URLs are already clean, so a match that swallows one ("https" + "://...") loses nothing.
    s = _ASSIGN.sub(lambda m: f"{m[1]}{m[2]}{MASK}"
                    if is_secret_name(m[1]) and not _ENV_REF.match(m[3]) else m[0], s)
    return _AWS_KEY_ID.sub(MASK, s)


def redact_config(value, key: str | None = None):
    """A copy of a config tree fit to store: the values of `${VAR}` references the config expanded
    go back to `${VAR}`, URL credentials and secret query values are removed, and the whole value of
    a secret-named key is masked."""
    if key is not None and is_secret_name(key) and value not in (None, "", True, False):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v) for v in value)
    return value
