"""Names users choose that end up in store paths: validated before anything is written."""
from __future__ import annotations

import re

from pippo_common.errors import DataError

MAX_TAG_LEN = 100
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_CAMERA_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _shown(name: str, limit: int = 40) -> str:
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def validate_name(name, what: str = "name") -> str:
    """A name that becomes one path segment (a tag file, a workflow step's record directory, a
    training run's directory): 1-100 characters of letters, digits and . _ + - starting with a
    letter or digit — no separators, no '..', nothing that leaves the directory it is put in."""
    if not isinstance(name, str) or not name:
        raise DataError(f"invalid {what} {_shown(name)}: must not be empty")
    if len(name) > MAX_TAG_LEN:
        raise DataError(f"invalid {what} {_shown(name)}: {len(name)} characters (at most {MAX_TAG_LEN})")
    if not _TAG.fullmatch(name):
        raise DataError(f"invalid {what} {_shown(name)}: use letters, digits and . _ + - "
                        "(starting with a letter or digit)")
    return name


def validate_tag(name) -> str:
    """A tag name is a file name under tags/ and the REF of `URI@REF`: a `validate_name`, and
    not 'latest'."""
    if name == "latest":
        raise DataError("invalid tag name 'latest': it always means the newest version")
    return validate_name(name, "tag name")


def validate_camera_id(cam_id) -> str:
    """A camera id names files of a capture (image/cam{ID}.zip): no separators, no '..'."""
    if not isinstance(cam_id, str) or not _CAMERA_ID.fullmatch(cam_id) or ".." in cam_id or len(cam_id) > 100:
        raise DataError(f"invalid camera id {_shown(cam_id)}: use letters, digits and _ . -")
    return cam_id


def check_text(value: str, what: str) -> str:
    """A URI or path from a config: not empty, no control characters (it is printed on one line)."""
    if not value or not value.strip():
        raise DataError(f"{what} must not be empty")
    if _CONTROL.search(value):
        raise DataError(f"{what} {_shown(value)} contains control characters")
    return value

