"""Errors raised on bad input data. Each message names what and where (capture, camera, frame)."""


class DataError(ValueError):
    """Bad input data: the message is one line saying what is wrong and where."""


class CalibrationError(DataError):
    """A camera calibration that violates SPEC §4 (R not a rotation, bad focal, non-finite...)."""


class CaptureError(DataError):
    """A capture that cannot be read: missing or corrupt zip, missing frame, undecodable image."""
