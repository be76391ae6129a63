"""Checks of the counts that command handlers, subscriptions and stores are built with
(``retries``, ``cache_size``, ``batch_size``...): one rule, so a bad option is the same
:class:`~incident.errors.InvalidArgument` (a ValueError) everywhere, raised before
anything is opened, and never a float or a bool taken for a count."""

from __future__ import annotations

from .errors import InvalidArgument

__all__ = ["check_count"]


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
