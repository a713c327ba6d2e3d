"""Errors raised on bad input captures. Each message names what and where (capture, camera,
frame); DataError, their base, is pippo_common.errors' (raised by every package)."""
from pippo_common.errors import DataError


class CalibrationError(DataError):
    """A camera calibration that violates SPEC §4 (R not a rotation, bad focal, non-finite...)."""


class CaptureError(DataError):
    """A capture that cannot be read: missing or corrupt zip, missing frame, undecodable image."""
