"""What a ``sqlite://`` URL names: a file, or ``MEMORY`` (a private in-memory database)."""

from __future__ import annotations

from urllib.parse import urlsplit

from ...errors import IncidentError

__all__ = ["MEMORY", "sqlite_path"]

MEMORY = ":memory:"


def sqlite_path(url: str) -> str:
    """The file a ``sqlite://`` URL names (``:memory:`` for ``sqlite://``).

    >>> sqlite_path("sqlite:///bank.db"), sqlite_path("sqlite:////var/lib/bank.db")
    ('bank.db', '/var/lib/bank.db')
    >>> sqlite_path("sqlite://")
    ':memory:'
    """
    expected = "expected sqlite:///relative.db, sqlite:////absolute/path.db or sqlite://"
    try:
        parts = urlsplit(url)
    except ValueError as error:  # "Invalid IPv6 URL": a bracket in the host's place
        raise IncidentError(f"Not an SQLite URL: {url!r} ({error}); {expected}") from None
    if parts.scheme.lower() != "sqlite" or parts.netloc:
        raise IncidentError(f"Not an SQLite URL: {url!r}; {expected} (in memory)")
    if "\x00" in parts.path:  # the OS would refuse it later, with a bare ValueError
        raise IncidentError(f"Not an SQLite URL: {url!r}; a file name cannot hold a NUL")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return path or MEMORY
