"""What every command module of the CLI shares: the one way to add a command, the bounded
argument types and the common flags. Light on purpose (argparse only): every command module is
imported to build the parser, so `pippo --help` must not pay for torch, Ray or MLflow."""
from __future__ import annotations

import argparse
from typing import Callable

EPILOG = ("Configs are YAML files; override any key after the file name as key.sub=value "
          "(values parsed as YAML). Environment: PIPPO_STORE, MLFLOW_TRACKING_URI, RAY_ADDRESS, "
          "AWS_ENDPOINT_URL.")

Handler = Callable[[argparse.Namespace], int]


def add_command(sub, name: str, handler: Handler, help_text: str, description: str | None = None):
    """The one registration style: a subcommand parser bound to its handler (set_defaults), which
    the CLI calls with the parsed arguments."""
    p = sub.add_parser(name, help=help_text, description=description or help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p


def add_group(top, name: str, help_text: str, description: str, dest: str):
    """A command with subcommands (`pippo data ...`): its subparsers action."""
    group = top.add_parser(name, help=help_text, description=description)
    return group.add_subparsers(dest=dest, metavar="SUBCOMMAND", required=True)


def json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout and nothing else")


def int_in(low: int, high: int):
    """argparse type: an integer within low..high (a negative count or zero cameras is one line)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
        return value
    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not low <= value <= high:      # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is not within {low:g}..{high:g}")
        return value
    parse.__name__ = "number"
    return parse


SIDE = int_in(16, 8192)          # image sides in pixels
SEED = int_in(0, 2**31 - 1)
