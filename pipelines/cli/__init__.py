"""The `pippo` command line (SPEC §2): the parser assembled from one module per command group.

Each command module (data, train, pipeline, cluster, compare, sample, eval, model) exposes
`register(subparsers)`, which adds its parsers bound to their handlers (set_defaults(handler=...));
a handler parses nothing itself: it calls a library function and prints. Libraries never import
this package. Command modules import only argparse-level code at the top, so `pippo --help` stays
instant and a command never pays for torch or Ray unless it uses them. Every error a user can
cause ends as one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import sys

from pipelines.cli import shutdown
from pipelines.cli.args import EPILOG


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line promise: a usage error is one line on stderr (exit 2), not the
    usage block plus the error."""

    def error(self, message):
        from pippo_common.errors import EXIT_USER
        from pippo_common.redact import redact_text
        from pippo_common.text import one_line
        self.exit(EXIT_USER, f"{self.prog}: error: {one_line(redact_text(message))} (see {self.prog} --help)\n")


def _verbosity_flags(p, top: bool) -> None:
    """-v/-q on the top parser and on every subcommand (`pippo data build C -v` = `pippo -v data
    build C`). Subcommands default to SUPPRESS so they never overwrite a flag given before them."""
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (and libraries' INFO lines, tracebacks of errors)", **default)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only", **default)


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):   # aliases repeat a parser
                yield from _all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    # the order of registration is the order of `pippo --help`
    from pipelines.cli import cluster, compare, data, eval, model, pipeline, sample, train

    parser = _Parser(
        prog="pippo",
        description="Pippo pipeline: data build (Ray -> WebDataset versions), DeepSpeed training "
                    "stages, workflow runs, Ray job submission and MLflow comparison.",
        epilog=EPILOG)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (data, train, pipeline, cluster, compare, sample, eval, model):
        module.register(top)
    for n, sub in enumerate(_all_parsers(parser)):
        _verbosity_flags(sub, top=n == 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pippo_common.redact import redacting, register_url_credentials

    shutdown.own_process = argv is None           # the console script, not an in-process caller
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:                 # e.g. s3://KEY:SECRET@bucket: never echoed, in any form
        register_url_credentials(arg)
    # Every line printed (result lines, Ray's forwarded worker lines, libraries' prints) goes
    # through the one redactor; the streams are given back afterwards (in-process callers).
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = redacting(out), redacting(err)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str]) -> int:
    from pippo_common.errors import report
    from pippo_common.logs import configure
    from pippo_common.text import one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    configure(1 if verbose else -1 if getattr(args, "quiet", False) else 0)
    try:
        code = args.handler(args)
        sys.stdout.flush()       # a closed pipe must fail here, not at interpreter exit
    except BrokenPipeError:
        if _stdout_broken():     # `pippo data versions D | head -1`: the reader left; so do we
            _silence_stdout()
            return 141           # 128 + SIGPIPE, what a shell reports for `seq 9999 | head -1`
        return report(sys.exc_info()[1], verbose)
    except KeyboardInterrupt as exc:      # a command may say where it stopped and how to continue
        shutdown.end_ray()
        where = one_line(str(exc)) if str(exc) else ""
        print(f"pippo: interrupted{': ' + where if where else ''}", file=sys.stderr)
        return 130
    except Exception as exc:
        shutdown.end_ray()
        return report(exc, verbose)      # the one convention (pippo_common.errors), cluster commands too
    return int(code or 0)


def _stdout_broken() -> bool:
    """True if stdout is a pipe or socket whose reader has gone (not some other broken pipe,
    e.g. to an object store, which is an error to report)."""
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no real fd (an in-process test's stdout)
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
