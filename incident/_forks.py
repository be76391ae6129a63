"""What must not cross a fork: locks a parent's thread may hold, connections, drawn
random ids. Each owner names the method that renews its state, and a forked child calls
them all before it runs anything else."""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable

__all__ = ["renew_in_forked_children"]

_renewals: list[Callable[[], Callable[[], None] | None]] = []
_registering = threading.Lock()


def renew_in_forked_children(renew: Callable[[], None]) -> None:
    """Call ``renew`` first thing in every child forked from now on. A bound method
    does not keep its object alive: once the object is gone, nothing is called."""
    reference: Callable[[], Callable[[], None] | None] = (
        weakref.WeakMethod(renew) if inspect.ismethod(renew) else (lambda: renew)
    )
    with _registering:
        _renewals[:] = [r for r in _renewals if r() is not None]  # forget the dead
        _renewals.append(reference)


def _after_fork_in_child() -> None:
    for reference in list(_renewals):  # not under the lock: a parent's thread may hold it
        renew = reference()
        if renew is not None:
            renew()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
