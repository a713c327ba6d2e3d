"""Logging of pippo processes: one stderr format, credentials redacted, libraries quiet. The one
set-up of the CLI, of Ray workers (the runtime_env hook) and of training workers.

    configure(verbosity)   the CLI's setup: -1 = -q (warnings only), 0 = default (pippo INFO,
                           libraries WARNING), 1 = -v (pippo DEBUG, libraries INFO)
    configure_once(level)  a process that may already be set up (a training worker: under the CLI,
                           a Ray worker's hook, or a library call): set up once, else only
                           re-apply the levels libraries reset when imported (DeepSpeed, Ray)
    setup_worker()         Ray's worker_process_setup_hook: redacted prints too
    quiet_ray()            Ray resets its loggers when it is imported (the "ray" logger to INFO, and
                           ray.data's dictConfig resets every ray.data.* child): call this right
                           after `import ray` / `ray.init` to apply the current verbosity to them
"""
from __future__ import annotations

import logging
import os
import sys

from pippo_common.redact import redact_text, redacting

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Routine INFO chatter of libraries: "Found credentials in environment variables.", connection
# pool notes, lock files, image plugins... shown with -v only.
LIBRARIES = ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "fsspec", "urllib3", "requests",
             "asyncio", "filelock", "PIL", "matplotlib", "httpx", "httpcore", "git", "numba",
             "DeepSpeed")    # deepspeed.utils.logger: INFO on import, its own handler
# Ray's routine lines logged as WARNINGs that say nothing about the job: the token-auth notice of
# every local start, and "Progress bars disabled" (we disable them on purpose). Shown with -v.
RAY_ROUTINE = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")
VERBOSITY_ENV = "PIPPO_VERBOSITY"      # inherited by Ray workers and job entrypoints

_handler: logging.Handler | None = None


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then removes credentials from the whole text (message and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def verbosity() -> int:
    try:
        return max(-1, min(1, int(os.environ.get(VERBOSITY_ENV, "0"))))
    except ValueError:
        return 0


def configure(level: int = 0) -> None:
    """Route log records to the current sys.stderr (one handler of ours, replaced on each call so
    in-process callers such as tests see their own stderr) and set the levels of `level`."""
    global _handler
    os.environ[VERBOSITY_ENV] = str(level)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        logging.getLogger("pippo").removeHandler(_handler)
    logging.getLogger("pippo").propagate = True     # configure_once(own_records) may have cut it
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(RedactingFormatter(FORMAT))
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if level > 0 else logging.WARNING if level < 0 else logging.INFO)
    logging.getLogger("pippo").setLevel(logging.NOTSET)   # the root decides (an in-process run may have set it)
    _library_levels(level)


def _library_levels(level: int) -> None:
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if level > 0 else logging.WARNING)
    for name in RAY_ROUTINE:
        logging.getLogger(name).setLevel(logging.NOTSET if level > 0 else logging.ERROR)
    quiet_ray()


def configure_once(level: int | None = None, own_records: bool = False) -> None:
    """configure(level, default: the inherited PIPPO_VERBOSITY) unless this process is set up
    already (the CLI, a Ray worker's hook), whose levels then stand; either way the levels of
    libraries that reset their logger on import (DeepSpeed) are applied again.

    `own_records`: pippo's records go to our handler alone, not up to the root. Ray Train's
    workers put a handler of their own on the root logger (plain format, stdout): without this
    every pippo line would print twice, once unredacted."""
    if _handler is None:
        configure(verbosity() if level is None else level)
    else:
        _library_levels(verbosity())
    if own_records:
        pippo = logging.getLogger("pippo")
        if _handler not in pippo.handlers:
            pippo.addHandler(_handler)
        pippo.propagate = False


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook` (runtime_env): a worker's log lines, which Ray forwards to
    the driver's stderr and keeps in the cluster's session logs, get the same format, levels
    (PIPPO_VERBOSITY is inherited) and redaction; so do its prints (DeepSpeed's, a library's).
    The worker inherits the driver's environment, so the redactor knows the same env secrets."""
    sys.stdout, sys.stderr = redacting(sys.stdout), redacting(sys.stderr)
    configure(verbosity())


def ray_output_to_stderr() -> None:
    """Send every line Ray forwards to this driver (workers' stdout, raylet and autoscaler notices)
    to stderr: stdout carries a command's result (SPEC §2), and a raylet warning must never be
    the line a script reads. Ray has no option for this (log_to_driver is all or nothing), so its
    forwarding handler is replaced with the same printer told that every line is stderr's; if
    Ray's internals move, lines keep their stream and nothing else changes."""
    import functools

    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)
        dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError):
        return
    dispatcher.add_handler("ray_print_logs", lambda data: printer({**data, "is_err": True}))


def unconfigure() -> None:
    """Remove our handler (tests: it holds the stderr of the call that configured it)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        logging.getLogger("pippo").removeHandler(_handler)
        logging.getLogger("pippo").propagate = True
        _handler = None


def quiet_ray() -> None:
    """Apply the verbosity to Ray's loggers if Ray is imported (they have their own handlers and
    do not propagate, so the root level does not reach them)."""
    if "ray" not in sys.modules:
        return
    level = verbosity()
    wanted = logging.INFO if level > 0 else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(wanted)
    for name in RAY_ROUTINE:
        logging.getLogger(name).setLevel(logging.NOTSET if level > 0 else logging.ERROR)
