"""Validations that several commands share, so each says the same thing in the same error."""
from __future__ import annotations

from pippo_common.errors import ConfigError


def check_resolution(side: int, unit: int, what: str = "resolution", at_most: int | None = None) -> int:
    """`side` must fall on whole tokens: a positive multiple of `unit` (the model's VAE
    downsampling x patch size), and at most `at_most`. ConfigError (a ValueError and a UserError:
    one line, exit 2) naming `what` otherwise; returns `side`."""
    if side < unit or side % unit or (at_most is not None and side > at_most):
        limit = f", at most {at_most}" if at_most is not None else ""
        raise ConfigError(f"{what} {side} is not a positive multiple of {unit} "
                          f"(the model's VAE downsampling x patch size){limit}")
    return side
