"""Appends the database numbers: one round trip whoever else is writing, with the append
lock held for one server-side step.

Predicting the log's last position (:mod:`.prediction`) works for one writing process.
Under several, the guess is usually wrong and the append reads the heads under the lock,
then writes: the lock then waits for a round trip to the client, for every append in
the schema. An append whose inline work does not look at positions needs neither: the
``append_numbered`` function (migration 0006) takes the lock, checks the stream's
version and the key, and leaves the last position in ``incident.base``; the rows sent
with it in the same pipeline number themselves from it. Whether the inline work looks at
positions is found by running it on placeholder positions first (:mod:`..unnumbered`);
if it does, the append goes the predicted or locked way, as before."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg

from ...messages import Recorded
from .._common import effects_of, owed_row, stamp
from ..protocols import Effects
from ..unnumbered import Placeholders, Unnumbered
from .append_job import AppendJob, Committing, Written, key_first, raise_if_moved
from .database import Database
from .durability import FLUSH_IF_WAITED
from .migrations import KEY_USED
from .projections import PostgresProjectionStore
from .session import Connection, prepared_message_transaction
from .sql import EventStatements, event_row

_OWED_POSITION = 1  # the position's place in an owed row (OWED_COLUMNS)


class NumberedAppends:
    """The numbered path of one event store; ``available`` until a schema without
    ``append_numbered`` (not migrated by this version) says otherwise."""

    def __init__(
        self, db: Database, statements: EventStatements, projections: PostgresProjectionStore
    ) -> None:
        self._db, self._sql, self._projections = db, statements, projections
        self.available = True

    def append(self, conn: Connection, job: AppendJob, channel: str) -> Committing | None:
        """The append, committed (not yet durable), or None when it must be numbered in
        the client: its inline work looks at positions, its expected version is ANY, a
        projection's table may still need making, or the key was used (the locked path
        says what it stored). A conflict is a ConcurrencyError, nothing written."""
        statements = self.message(job, channel)
        if statements is None:
            return None
        try:
            results = prepared_message_transaction(conn, statements, then=FLUSH_IF_WAITED)
        except psycopg.Error as error:
            if self.declined(job, error):
                return None
            raise
        return self.committed(job, results)

    def message(self, job: AppendJob, channel: str) -> list[tuple[str, Sequence[Any]]] | None:
        """The statements of the append's one message (sent by ``one_message_transaction``
        with FLUSH_IF_WAITED after them), or None if it cannot be numbered by the
        database (see :meth:`append`)."""
        version = job.request.expected_version
        if not self.available or not isinstance(version, int):
            return None
        stand_ins = stamp(
            job.request.aggregate_id,
            job.request.aggregate,
            job.events,
            first_position=0,
            first_version=version + 1,
            metadata=job.request.metadata,
        )
        placeholders = Placeholders()
        prepared = self._prepare(job, placeholders, placeholders.stand_in(stand_ins))
        if prepared is None:
            return None
        recorded, effects, upserts = prepared
        job.sent.append((recorded, effects, []))  # its ids, if the connection dies
        # append_numbered makes the commit asynchronous if it waited for the lock
        return [
            (
                self._sql.append_numbered,
                (
                    self._db.append_lock,
                    job.request.aggregate_id,
                    version,
                    job.request.idempotency_key,
                    channel,
                    len(recorded),
                ),
            ),
            *self._rows(job, recorded, effects, upserts),
        ]

    def declined(self, job: AppendJob, error: psycopg.Error) -> bool:
        """Whether the server's refusal of the message means "not this way" (the key was
        used, or the schema predates append_numbered): the append goes another way. A
        moved stream is the append's ConcurrencyError (nothing was written), unless
        its key is to be read first (``key_first``)."""
        if isinstance(error, psycopg.errors.UndefinedFunction):
            self.available = False  # a schema from before 0006, not migrated here
            return True
        raise_if_moved(job, error)
        return error.sqlstate == KEY_USED or key_first(job, error)

    def committed(self, job: AppendJob, results: list[list[tuple[Any, ...]] | None]) -> Committing:
        """What the message wrote, once committed: the envelopes renumbered from the base
        the database gave, and the row of WAL positions (FLUSH_IF_WAITED's)."""
        numbered, positions = results[0], results[-1]
        assert numbered and positions
        recorded, effects, _ = job.sent[-1]
        final = renumbered(recorded, int(numbered[0][0]))
        # owed work holds its cause's envelope: made again with the real positions
        written: Written = (
            final,
            effects_of(job.project, final, checked=not job.shared) if effects.owed else effects,
            [],
        )
        job.sent[-1] = written
        return written, positions[0]

    def _prepare(
        self, job: AppendJob, placeholders: Placeholders, stand_ins: list[Recorded[Any]]
    ) -> tuple[list[Recorded[Any]], Effects, list[tuple[str, str]]] | None:
        """The inline work run on placeholder positions, and its projections encoded;
        None if it looked at a position (or failed, which the ordinary path will show
        again on real positions), or a projection's table may need making."""
        try:
            effects = effects_of(job.project, stand_ins, checked=not job.shared)
            if placeholders.used:
                return None
            projections = effects.projections if job.shared else []
            if not self._projections.known(map(type, projections)):
                return None
            # a placeholder copied into a row fails to encode here
            upserts = self._projections.upserts(projections)
            if not job.shared:
                for projection in effects.projections:
                    msgspec.json.encode(projection)
        except Exception:
            return None
        if placeholders.used:
            return None
        return stand_ins, effects, upserts

    def _rows(
        self,
        job: AppendJob,
        recorded: list[Recorded[Any]],
        effects: Effects,
        upserts: list[tuple[str, str]],
    ) -> list[tuple[str, Sequence[Any]]]:
        """The statements after the lock: rows numbered by the database."""
        statements: list[tuple[str, Sequence[Any]]] = []
        for record, payload in zip(recorded, job.payloads, strict=True):
            row = event_row(record, payload, job.metadata_text)
            statements.append((self._sql.insert_numbered, (_offset(record.position), *row[1:])))
        if job.request.idempotency_key is not None:
            key = job.request.idempotency_key
            statements.append((self._sql.remember_key_numbered, (key, len(recorded))))
        for work in effects.owed:
            values = list(owed_row(work))
            values[_OWED_POSITION] = _offset(values[_OWED_POSITION])
            statements.append((self._sql.owe_numbered, values))
        statements.extend((upsert, (payload,)) for upsert, payload in upserts)
        return statements


def renumbered(stand_ins: list[Recorded[Any]], base: int) -> list[Recorded[Any]]:
    """The envelopes with their real positions, once the database has said the base."""
    return [
        msgspec.structs.replace(record, position=base + _offset(record.position))
        for record in stand_ins
    ]


def _offset(position: Any) -> int:
    assert isinstance(position, Unnumbered)
    return position.offset
