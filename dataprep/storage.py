"""Object-store helpers on fsspec: every URL (local path, file://, s3://, ...) goes through here.

Writes are atomic: on a local filesystem we write a temporary name and rename it (POSIX rename is
atomic); on an object store a single PUT is already atomic (the object appears whole or not at
all), so we write the final key directly.
"""
from __future__ import annotations

import os
import posixpath
import uuid

import fsspec


def fs_and_path(url: str, **storage_options):
    """(filesystem, path) of any fsspec URL or local path."""
    return fsspec.core.url_to_fs(str(url), **storage_options)


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
