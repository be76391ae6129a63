"""Checks of the counts that command handlers, subscriptions and stores are built with
(``retries``, ``cache_size``, ``batch_size``...): one rule, so a bad option is the same
:class:`~incident.errors.InvalidArgument` (a ValueError) everywhere, raised before
anything is opened, and never a float or a bool taken for a count."""

from __future__ import annotations

import math

from .errors import InvalidArgument

__all__ = ["check_count", "check_seconds"]


def check_count(option: str, value: object, least: int, *, none_too: bool = False) -> None:
    """``value`` must be an int >= ``least`` (or None, when ``none_too``).

    >>> check_count("retries", 0, 0)
    >>> check_count("retries", 1.5, 0)
    Traceback (most recent call last):
    ...
    incident.errors.InvalidArgument: retries must be an int >= 0, got 1.5
    """
    if none_too and value is None:
        return
    if type(value) is not int or value < least:
        alternative = " or None" if none_too else ""
        raise InvalidArgument(f"{option} must be an int >= {least}{alternative}, got {value!r}")


def check_seconds(option: str, value: object, *, positive: bool = False) -> None:
    """``value`` must be a finite number of seconds >= 0 (> 0, when ``positive``): a
    pause that a sleep or a wait can take, never a bool, a str, NaN or infinity.

    >>> check_seconds("backoff", 0)
    >>> check_seconds("idle", 0, positive=True)
    Traceback (most recent call last):
    ...
    incident.errors.InvalidArgument: idle must be a finite number of seconds > 0, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        fits = False
    else:
        fits = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not fits:
        bound = "> 0" if positive else ">= 0"
        raise InvalidArgument(f"{option} must be a finite number of seconds {bound}, got {value!r}")
