"""The one error family and the one way a command reports a failure.

Every error a user can cause (a bad config, bad data, an unreachable store or cluster, a refused
credential) is a `UserError`: the CLI prints it as one redacted line, `pippo: error: ...`, and
exits 2. Anything else is a bug: a redacted traceback and exit 1 (with -v, user errors show their
traceback too). An exception with an integer `exit_code` explains itself in one line and exits
with that code (a training stage that failed on the cluster). The cluster commands (`pippo
submit`, `pippo jobs`) raise into the same `report` instead of printing their own lines.

Subclasses stay next to the code that raises them (CalibrationError in dataprep, SubmitError in
cluster, ...); the ones here are those several packages raise.
"""
from __future__ import annotations

import sys
import traceback

from pippo_common.redact import redact_text
from pippo_common.text import one_line

EXIT_BUG = 1
EXIT_USER = 2
PROG = "pippo"


class UserError(Exception):
    """An error caused by input (config, data, arguments, environment); one line, exit 2."""


class ConfigError(UserError, ValueError):
    """A config that cannot be read or does not fit its dataclass (the message names the key)."""


class DataError(UserError, ValueError):
    """Bad input data: the message is one line saying what is wrong and where."""


class Failed(RuntimeError):
    """A failure that is neither the input's fault nor a bug (a job that failed or would not stop,
    training that failed beyond its retries): one line, exit `exit_code` (1)."""
    exit_code = EXIT_BUG


def is_user_error(exc: BaseException) -> bool:
    """Caused by input, not by a bug: the family, and a file that is not there."""
    return isinstance(exc, (UserError, FileNotFoundError))


def user_error_message(exc: BaseException) -> str | None:
    """The line to print if `exc` was caused by input, a file, the network or a store (not by a
    bug), else None. Ray task errors are judged by their cause."""
    cause = getattr(exc, "cause", None)
    if type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return user_error_message(cause)
    if is_user_error(exc):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError):          # files, permissions, disk, network: the environment
        if exc.strerror and exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if any(c.__module__.split(".")[0] in ("botocore", "aiobotocore") for c in type(exc).__mro__):
        return f"object store: {type(exc).__name__}: {exc}"   # endpoint, credentials, bucket
    return None


def error_line(message) -> str:
    """The one form of an error line: program, `error:`, the message redacted on one line."""
    return f"{PROG}: error: {one_line(redact_text(message))}"


def report(exc: BaseException, verbose: bool = False, stream=None) -> int:
    """Print `exc` the one way and return the exit code: one redacted line and 2 for a user error;
    a redacted traceback and 1 for anything else. With `verbose`, user errors show their
    traceback too."""
    stream = sys.stderr if stream is None else stream
    message = user_error_message(exc)
    code = getattr(exc, "exit_code", None)      # a failure that explains itself in one line
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if message is None and isinstance(code, int):
        if verbose:
            stream.write(redact_text(trace))
        print(error_line(str(exc)), file=stream)
        return code
    if message is None or verbose:
        stream.write(redact_text(trace))
    if message is None:
        return EXIT_BUG
    print(error_line(message), file=stream)
    return EXIT_USER
