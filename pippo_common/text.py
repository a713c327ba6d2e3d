"""Text fit for one terminal line: what every error line and every name read back from a store
or MLflow goes through (anyone who could write a run can set a name)."""
from __future__ import annotations

import re

# Terminal escape sequences (CSI "ESC [ ... final", OSC "ESC ] ... BEL|ESC \", two-byte ESC x),
# then any other C0/C1 control and the bidi overrides that reorder what a terminal shows.
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
                              r"|[\x1b\x9d]\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -~]?")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """`text` fit for one terminal line: escape sequences removed, other control characters
    (newlines too) shown as spaces."""
    return _UNPRINTABLE.sub(" ", _ESCAPE_SEQUENCE.sub("", str(text)))


def one_line(text, limit: int = 1000) -> str:
    """`text` printable, whitespace runs collapsed, at most `limit` characters."""
    text = " ".join(printable(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
