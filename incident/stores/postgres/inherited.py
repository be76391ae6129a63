"""Sessions a forked child inherits: its parent's, through copies of their sockets.

The child must neither use them (it would interleave with the parent on one session)
nor close them (libpq's goodbye would end the parent's session), and it must not hold
its copy of their sockets either: while any process has a socket open the server
keeps the session, so a parent that died in the middle of a transaction would keep
its locks (an append's) for as long as its children live, and every writer would wait.
So, first thing in the child, every connection incident opened has its socket swapped
for /dev/null (:func:`sever`): the parent's session lives and dies with the parent,
and whatever the child's copy of the connection object writes later goes nowhere."""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, TypeVar

import psycopg

from ..._forks import renew_in_forked_children

__all__ = ["opened", "sever"]

C = TypeVar("C")  # a psycopg connection, sync or async (the type it is stays)

_opened: weakref.WeakSet[Any] = weakref.WeakSet()
_severed: list[Any] = []  # kept: their objects stay inert in this process


def opened(connection: C) -> C:
    """Note a connection incident opened, to be severed in a forked child."""
    _opened.add(connection)
    return connection


def sever(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """Let go of this process's copy of ``connection``'s socket without a goodbye."""
    with contextlib.suppress(OSError, psycopg.Error):  # closed already: nothing to let go
        nowhere = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(nowhere, connection.pgconn.socket)
        finally:
            os.close(nowhere)
    _severed.append(connection)


def _sever_inherited() -> None:
    for connection in list(_opened):
        sever(connection)
    _opened.clear()


# registered when this module is first imported, before any store exists: it runs
# before the stores' own renewals, which may drop their references to these objects
renew_in_forked_children(_sever_inherited)
