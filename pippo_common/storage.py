"""Object-store helpers on fsspec: every URL (local path, file://, s3://, ...) goes through here.
Local files that must be regular files (configs, captures, listed inputs) are opened with
`open_regular`: stat first, so a FIFO or a device is refused without being opened (opening a FIFO
blocks, reading /dev/zero never ends), then O_NONBLOCK and a second check on the descriptor.

Writes are atomic: on a local filesystem we write a temporary name and rename it (POSIX rename is
atomic); on an object store a single PUT is already atomic (the object appears whole or not at
all), so we write the final key directly.
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
import uuid

import fsspec

from pippo_common.errors import DataError
from pippo_common.redact import has_credentials, redact_text

# Object stores whose URL authority is a bucket name: an "@" there can only be credentials.
_BUCKET_SCHEMES = re.compile(r"(?:s3a?|gs|gcs)://", re.IGNORECASE)
PROBE_TIMEOUT_S = 5.0


class StorageError(DataError):
    """A URL that cannot be opened, or an object store that cannot be reached: one line."""


def fs_and_path(url: str, **storage_options):
    """(filesystem, path) of any fsspec URL or local path."""
    url = str(url)
    if _BUCKET_SCHEMES.match(url) and (has_credentials(url) or "@" in url.split("/")[2]):
        # s3fs would take "KEY:SECRET@bucket" for a bucket name and botocore echo it in its error
        raise StorageError(f"{redact_text(url)}: credentials in an object-store URL are not supported "
                           "(and never printed); use the AWS_* environment variables or a profile")
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ValueError, ImportError) as exc:    # unknown protocol, its package not installed
        raise StorageError(f"cannot open {redact_text(url)}: {' '.join(redact_text(exc).split())}") from None


def check_store(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, in one line, if the object store of `url` cannot be used: a dead endpoint, wrong
    credentials or a missing bucket. s3:// only (local paths fail fast by themselves): one
    list request with one attempt and short timeouts, where the store's own client would retry
    for ~12 s (botocore's and s3fs's retries multiplied) before a traceback."""
    fs, path = fs_and_path(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("s3", "s3a"):
        return
    import s3fs

    config = {**fs.storage_options.get("config_kwargs", {}),
              "connect_timeout": timeout_s, "read_timeout": 2 * timeout_s,
              "retries": {"max_attempts": 1, "mode": "standard"}}
    probe = s3fs.S3FileSystem(**{**fs.storage_options, "config_kwargs": config, "skip_instance_cache": True})
    probe.retries = 1                       # s3fs's own retry loop around botocore's
    bucket, key, _ = probe.split_path(path)
    shown = redact_text(url)
    try:
        probe.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except PermissionError as exc:
        raise StorageError(f"{shown}: access denied by the object store ({redact_text(exc)}); check the "
                           "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)") from None
    except FileNotFoundError:
        raise StorageError(f"{shown}: bucket {bucket!r} does not exist") from None
    except Exception as exc:
        name = type(exc).__name__
        if name == "NoCredentialsError":
            raise StorageError(f"{shown}: no AWS credentials found (set AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
        if "Connect" in name or "Timeout" in name:
            client = getattr(probe, "_s3", None)
            endpoint = (getattr(getattr(client, "meta", None), "endpoint_url", None)
                        or os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint")
            raise StorageError(f"{shown}: cannot reach the object store at {redact_text(endpoint)} "
                               f"({name}); check AWS_ENDPOINT_URL and the network") from None
        raise StorageError(f"{shown}: the object store refused a listing ({name}: "
                           f"{' '.join(redact_text(exc).split())[:300]})") from None


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def join(url: str, *parts: str) -> str:
    return posixpath.join(str(url).rstrip("/"), *parts)


def url_of(fs, path: str) -> str:
    """The absolute URL of a path of filesystem `fs` (file:///abs/path, s3://bucket/key, ...)."""
    if is_local(fs):
        return f"file://{os.path.abspath(path)}"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def absolute_url(url: str) -> str:
    """Local paths become file:// URLs; other URLs are returned unchanged."""
    fs, path = fs_and_path(url)
    return f"file://{os.path.abspath(path)}" if is_local(fs) else str(url)


def atomic_write_bytes(url: str, data: bytes) -> None:
    fs, path = fs_and_path(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def register_webdataset_fsspec(protocols=("s3", "gs", "gcs", "az", "abfs", "memory")) -> None:
    """Let stock webdataset open shard URLs of object stores through fsspec (it knows only
    files, pipes and curl by itself)."""
    import importlib

    # `webdataset.gopen` the attribute is the function (re-exported); we need the module.
    gopen = importlib.import_module("webdataset.gopen")

    def open_with_fsspec(url, mode="rb", bufsize=8192, **_):
        return fsspec.open(url, mode).open()

    for protocol in protocols:
        gopen.gopen_schemes[protocol] = open_with_fsspec


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a regular file was expected."""


def open_regular(path: str):
    """A binary file object of a regular file; NotRegularFile for FIFOs, devices, sockets, dirs
    (checked by stat before any open, and again on the descriptor), FileNotFoundError if missing."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFile(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
