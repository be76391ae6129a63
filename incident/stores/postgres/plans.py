"""Appends written once, run by two drivers: a plan is a generator of the statements of
one append transaction (``Step``), which a driver sends on its connection, replying with
the rows of a step that asks for them; ``Tables`` asks the driver for the projection
tables the plan is about to write into. The sync driver (``run``, here) runs a plan on a
psycopg connection; the async store's (:mod:`.async_batch`) on an async one. So the
checks, the rows and the SQL of an append exist once, whichever side sends them.

The drivers run a plan inside a pipeline, between the BEGIN and the COMMIT they send
themselves: a step's statement is queued, not waited for, unless it asks for rows."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from ...messages import Projection
from .projections import PostgresProjectionStore
from .session import Connection, Query

__all__ = ["Plan", "Step", "Tables", "next_step", "run"]

T = TypeVar("T")


class Step(NamedTuple):
    """A statement of a plan; with ``rows`` the plan waits for its rows."""

    query: Query
    params: Sequence[Any] = ()
    rows: bool = False


class Tables(NamedTuple):
    """The plan is about to upsert into these types' tables; the answer is the types
    whose tables the driver created in the transaction (to remember once committed)."""

    types: list[type[Projection]]


Plan = Generator[Step | Tables, Any, T]


def next_step(plan: Plan[T], reply: Any) -> tuple[Step | Tables | None, T | None]:
    """The plan's next step, given the last one's reply; at its end (None), its result."""
    try:
        return plan.send(reply), None
    except StopIteration as done:
        return None, done.value


def run(conn: Connection, plan: Plan[T], projections: PostgresProjectionStore) -> T:
    """The plan's statements on a sync connection, in the caller's pipeline and
    transaction; missing projection tables are made in it (``prepare``)."""
    reply: Any = None
    while True:
        step, result = next_step(plan, reply)
        if step is None:
            return result  # type: ignore[return-value]  # a plan's end: its value
        if isinstance(step, Tables):
            reply = projections.prepare(conn, step.types)
        elif step.rows:
            reply = conn.execute(step.query, step.params).fetchall()
        else:
            conn.execute(step.query, step.params)
            reply = None
