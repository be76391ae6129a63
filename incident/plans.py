"""Plans: the command handler's logic as generators that do no I/O, run by a sync or an
async driver (the sans-I/O shape of h11 and of psycopg's protocol generators).

A plan yields the I/O it needs as values (:class:`Blocking` work on a store, a
:class:`~incident.stores.CommitCall` to commit an append,
:class:`Dispatch` of a follow-up command, a :class:`Pause`, an :class:`OnStream` try to run
in the stream's turn once it is contended, a :class:`Collided` notice) and is sent each
result, or thrown its error, at the ``yield``. :func:`drive` runs a plan on the calling
thread; ``incident.AsyncCommandHandler`` runs the same plans on an event loop, handing
``Blocking`` work to its store's worker threads and each commit to its async event
store, which hands concurrent ones over together. So there is one copy of the decisions
(validate, route, decide, retry, interpret the commit, pick the follow-ups) and two small
drivers that differ only in how they wait.

>>> def plan():
...     answer = yield Blocking(lambda: 40)
...     return answer + 2
>>> drive(plan(), lambda op: op.work())
42
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import Any, NamedTuple, TypeVar

from .messages import Command
from .stores.protocols import CommitCall

__all__ = [
    "Blocking",
    "Collided",
    "Dispatch",
    "OnStream",
    "Op",
    "Pause",
    "Plan",
    "advance",
    "drive",
]

T = TypeVar("T")


class Blocking(NamedTuple):
    """Work on the (sync) stores: ``work()`` returns its result or raises; an async
    driver runs it on the store's worker threads, never on the event loop."""

    work: Callable[[], Any]


class Dispatch(NamedTuple):
    """Dispatch a command (a follow-up) through the driver's own handler; the result is
    its recorded events, or its error thrown in."""

    command: Command
    metadata: Mapping[str, Any] | None


class Pause(NamedTuple):
    """Wait ``seconds`` (the jittered backoff after a version conflict)."""

    seconds: float


class OnStream(NamedTuple):
    """One try at a command on ``stream`` (aggregate name, id): the driver runs
    ``plan(trust_cache)`` with ``trust_cache`` true when the stream is not contended,
    else inside the stream's turn (its threads' or tasks' turn, and the store's) with
    ``trust_cache`` false, since other writers keep the cache stale there."""

    stream: tuple[str, str]
    first: bool
    plan: Callable[[bool], Plan[Any]]


class Collided(NamedTuple):
    """The stream met a version conflict: its writers take turns from now on."""

    stream: tuple[str, str]


Op = Blocking | CommitCall | Dispatch | Pause | OnStream | Collided
Plan = Generator[Op, Any, T]


def advance(plan: Plan[T], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``plan`` with the last op's result (or its error): ``(True, result)`` when
    the plan has ended, else ``(False, next op)``. Both drivers step plans through this."""
    try:
        return False, (plan.send(value) if error is None else plan.throw(error))
    except StopIteration as done:
        return True, done.value


def drive(plan: Plan[T], perform: Callable[[Op], Any]) -> T:
    """Run ``plan`` to its end, ``perform`` doing each op it yields (its result sent
    back, its exception thrown in); returns what the plan returns."""
    value: Any = None
    error: BaseException | None = None
    while True:
        done, out = advance(plan, value, error)
        if done:
            result: T = out
            return result
        try:
            value, error = perform(out), None
        except Exception as failed:  # the plan decides what an error means
            value, error = None, failed
