"""The predicted append: this process guesses the log's last position (:mod:`.prediction`)
and sends the lock, a check of the heads it expects and the rows in one round trip, as
plans (:mod:`.plans`) that the sync store and the async store each run. Also the rows of
one append once its heads are known (``rows_plan``), which the locked path sends too."""

from __future__ import annotations

import psycopg

from .._common import effects_of, owed_row, stamp
from .append_job import AppendJob, Written, key_first, raise_if_moved
from .database import Database
from .durability import ASYNC_COMMIT
from .migrations import KEY_USED, LOG_MOVED
from .plans import Plan, Step, Tables
from .prediction import Predictor
from .projections import PostgresProjectionStore
from .sql import EventStatements, event_row

__all__ = ["PredictedAppends", "rows_plan"]


def rows_plan(
    sql: EventStatements,
    projections: PostgresProjectionStore,
    job: AppendJob,
    version: int,
    last_position: int,
) -> Plan[Written]:
    """Inside the append's transaction, the heads known: the rows, the key and the
    projections (one statement per row: queued in the pipeline all the same)."""
    recorded = stamp(
        job.request.aggregate_id,
        job.request.aggregate,
        job.events,
        first_position=last_position + 1,
        first_version=version + 1,
        metadata=job.request.metadata,
    )
    for record, payload in zip(recorded, job.payloads, strict=True):
        yield Step(sql.insert, event_row(record, payload, job.metadata_text))
    if job.request.idempotency_key is not None:
        key = job.request.idempotency_key
        yield Step(sql.remember_key, [key, recorded[0].position, recorded[-1].position])
    effects = effects_of(job.project, recorded, checked=not job.shared)
    for work in effects.owed:  # in this schema whatever the projection store
        yield Step(sql.owe, owed_row(work))
    fresh = []
    if job.shared:
        fresh = yield Tables(list(map(type, effects.projections)))
        for upsert, payload_text in projections.upserts(effects.projections):
            yield Step(upsert, [payload_text])
    job.sent.append((recorded, effects, fresh))
    return job.sent[-1]


class PredictedAppends:
    """The predicted path of one event store."""

    def __init__(
        self,
        db: Database,
        sql: EventStatements,
        projections: PostgresProjectionStore,
        predictor: Predictor,
        channel: str,
    ) -> None:
        self._db, self._sql, self._projections = db, sql, projections
        self._predictor, self._channel = predictor, channel

    def plan(self, job: AppendJob, *, synchronous: bool) -> Plan[Written] | None:
        """The append's one-round-trip plan: begin_append (migration 0003) takes the
        lock, checks the stream's version, the guessed last position and the key, and
        queues the NOTIFY; then the rows. None without a guess (or an int version).
        ``synchronous``: the COMMIT waits for its flush (an append alone), else not (the
        caller then waits for a shared flush)."""
        last_position = self._predictor.guess()
        version = job.request.expected_version
        if last_position is None or not isinstance(version, int):
            return None
        return self._plan(job, version, last_position, synchronous)

    def _plan(
        self, job: AppendJob, version: int, last_position: int, synchronous: bool
    ) -> Plan[Written]:
        if not synchronous:
            yield Step(ASYNC_COMMIT)
        new_last = str(last_position + len(job.events))
        begin = [
            self._db.append_lock,
            job.request.aggregate_id,
            version,
            last_position,
            job.request.idempotency_key,
            self._channel,
            new_last,
        ]
        yield Step(self._sql.begin_append, begin)
        return (yield from rows_plan(self._sql, self._projections, job, version, last_position))

    def declined(self, job: AppendJob, error: psycopg.Error) -> bool:
        """Whether the server's refusal means "not this way", nothing written: another
        writer appended since the guess (the guess is dropped), the key was used, or the
        schema predates begin_append. A moved stream is the append's ConcurrencyError,
        unless its key is to be read first (``key_first``)."""
        if isinstance(error, psycopg.errors.UndefinedFunction):
            self._predictor.unavailable()  # a schema from before 0003, not migrated here
            return True
        raise_if_moved(job, error)
        if error.sqlstate == LOG_MOVED:
            self._predictor.missed()
            return True
        return error.sqlstate == KEY_USED or key_first(job, error)
