"""Several appends in one Postgres transaction: what the async store hands over when its
tasks commit at the same time (``PostgresEventStore.commit_many``).

The batch takes the schema's append lock once, reads the log's last position and the
heads of all its streams in one round trip, then checks each append in order against
the heads as the batch has moved them (its expected version; its ``project`` and its
projections' rows, computed before anything of it is sent): an append that fails gets
its own error and sends nothing, the others' rows go in, numbered one after another.
One COMMIT (asynchronous, so the lock is let go before the flush) and one shared flush
make them all durable before any is acknowledged, as for a single append
(docs/postgres-writes.md). So a batch costs two round trips and one fsync, however many
commands it holds.

What the server refuses (a row that cannot be stored) rolls the whole transaction back:
nothing of the batch was written, and each append goes again by itself, so the one at
fault fails alone. A connection lost in the batch, or a flush refused after its COMMIT
went through, is resolved by the events' ids, as for a single append: the batch is in
the log whole (one transaction) or not at all, and if not, each append goes again by
itself. Appends under an idempotency key go by
themselves (their key's earlier outcome is read under the lock).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

from ...errors import CommitUnknown, StoreError
from ...messages import Projection
from .._common import effects_of, owed_row, stamp
from ..arguments import check_expected_version
from ..protocols import Committed
from .append_job import AppendJob, Written
from .database import Database
from .durability import ASYNC_COMMIT, FLUSH_NOW, WAL_POSITIONS
from .plans import Plan, Step, Tables, run
from .prediction import Predictor
from .projections import PostgresProjectionStore
from .session import Afterwards, Connection, may_hide_a_commit, one_sync_transaction
from .sql import EventStatements, event_row

__all__ = ["BatchAppends", "BatchWritten"]

#: a batch's outcome per append (by its place in the caller's list); an append missing
#: from it was not written and goes again by itself
Outcomes = dict[int, Committed | Exception]
LookUp = Callable[[AppendJob, str, StoreError], Written | None]


BatchWritten = list[tuple[int, AppendJob]]  # the appends a batch wrote, by their place


class BatchAppends:
    """Writes several checked appends (``AppendJob``) in one transaction (see the module)."""

    def __init__(
        self,
        db: Database,
        sql: EventStatements,
        projections: PostgresProjectionStore,
        predictor: Predictor,
        channel: str,
        look_up: LookUp,
    ) -> None:
        self._db, self._sql, self._projections = db, sql, projections
        self._predictor, self._channel, self._look_up = predictor, channel, look_up
        self.transactions = 0  # batches committed, for tests and benchmarks

    def append(
        self, jobs: list[tuple[int, AppendJob]], committed: Callable[[], None] | None = None
    ) -> Outcomes:
        """Each job's outcome by its place, once durable. ``committed``, if given, is
        called once the transaction has committed and before its flush, so that the next
        batch can be written while this one's flush is under way (a flush shares the
        fsync with every commit before it); without it the flush goes in the same round
        trip as the COMMIT."""
        doing = f"appending the events of {len(jobs)} commands in one transaction"
        outcomes: Outcomes = {}
        written: list[tuple[int, AppendJob]] = []
        used: list[Connection] = []
        afterwards = Afterwards()
        then = FLUSH_NOW if committed is None else WAL_POSITIONS
        # while the store predicts, this process's appends take turns, so that a batch
        # never makes a lone append's guess of the last position wrong
        turn = self._db.append_turns if self._predictor.predicting else nullcontext()
        try:
            with self._db.in_flight.one(), self._db.connection(doing) as conn:
                used.append(conn)
                with turn:
                    with one_sync_transaction(conn, then=then) as afterwards:
                        written = run(conn, self.plan(jobs, outcomes), self._projections)
                    self._moved_past(written)  # committed: the next guess starts after it
                if committed is not None:
                    committed()
                self._db.durability.after(afterwards.row, conn)
        except StoreError as error:
            # committed, its flush failed: looked up, never sent again; or its COMMIT's
            # reply may be what was lost
            lost = used and may_hide_a_commit(used[0], error.__cause__)
            if not (afterwards.committed or lost):
                return outcomes  # the server said no: nothing was written, one by one
            return self.resolve_lost(written, outcomes, doing, error)
        return self.settle(written, outcomes)

    def settle(self, written: list[tuple[int, AppendJob]], outcomes: Outcomes) -> Outcomes:
        """Once the batch's transaction committed and is flushed: each written append's
        Committed (and its new projection tables remembered)."""
        self.transactions += 1
        for at, job in written:
            recorded, effects, fresh = job.sent[-1]
            self._projections.remember(fresh)
            outcomes[at] = Committed(recorded, effects)
        self._moved_past(written)  # the async driver's (the sync one's is in the turn)
        return outcomes

    def _moved_past(self, written: BatchWritten) -> None:
        """The log's last position is the batch's last event, if it wrote any."""
        if written:
            self._predictor.committed(written[-1][1].sent[-1][0][-1].position)

    def plan(self, jobs: list[tuple[int, AppendJob]], outcomes: Outcomes) -> Plan[BatchWritten]:
        """The batch's statements, inside its transaction, for a driver to run (the sync
        one above, the async store's): the lock, the heads, then each append checked and
        its rows sent. An append's own failure goes into ``outcomes`` and sends nothing.
        Returns the appends written, each with what it wrote in ``sent``."""
        yield Step(ASYNC_COMMIT)
        yield Step("SELECT pg_advisory_xact_lock(%s)", [self._db.append_lock])
        streams = list(dict.fromkeys(job.request.aggregate_id for _, job in jobs))
        heads = yield Step(self._sql.heads_of, [streams], rows=True)  # one round trip
        last_position: int = heads[0][0]
        versions: dict[str, int] = {stream: version for _, stream, version in heads}
        self._predictor.observed(last_position)
        written = []
        for at, job in jobs:
            request = job.request
            version = versions.get(request.aggregate_id, 0)
            try:
                check_expected_version(request.aggregate_id, request.expected_version, version)
                recorded = stamp(
                    request.aggregate_id,
                    request.aggregate,
                    job.events,
                    first_position=last_position + 1,
                    first_version=version + 1,
                    metadata=request.metadata,
                )
                effects = effects_of(job.project, recorded, checked=not job.shared)
                owed = [owed_row(work) for work in effects.owed]
                upserts = self._projections.upserts(effects.projections) if job.shared else []
            except Exception as error:  # this append's own: nothing of it was sent
                outcomes[at] = error
                continue
            for record, payload in zip(recorded, job.payloads, strict=True):
                yield Step(self._sql.insert, event_row(record, payload, job.metadata_text))
            for row in owed:
                yield Step(self._sql.owe, row)
            fresh: list[type[Projection]] = []
            if job.shared:
                fresh = yield Tables(list(map(type, effects.projections)))
                for upsert, payload_text in upserts:
                    yield Step(upsert, [payload_text])
            job.sent.append((recorded, effects, fresh))
            versions[request.aggregate_id] = recorded[-1].version
            last_position = recorded[-1].position
            written.append((at, job))
        if written:  # delivered when (and only if) this transaction commits
            yield Step("SELECT pg_notify(%s, %s)", [self._channel, str(last_position)])
        return written

    def resolve_lost(
        self,
        written: list[tuple[int, AppendJob]],
        outcomes: Outcomes,
        doing: str,
        error: StoreError,
    ) -> Outcomes:
        """The connection died in the batch: its appends are in the log together or not
        at all, so the first one's ids say which. Not there: each goes again by itself."""
        if not written:
            return outcomes
        first_at, first = written[0]
        try:
            stored = self._look_up(first, doing, error)
        except CommitUnknown as unknown:  # each command is told, with its own events' ids
            for at, job in written:
                ids = [record.event_id for record in job.sent[-1][0]]
                outcomes[at] = CommitUnknown(unknown.problem, job.request.aggregate_id, ids)
            return outcomes
        if stored is None:
            return outcomes
        for at, job in written:
            found = stored if at == first_at else self._look_up(job, doing, error)
            if found is None:  # cannot be: one transaction; say so rather than guess
                raise StoreError(
                    f"Postgres {doing}: after a lost connection, part of the batch is in "
                    "the log and part is not"
                ) from error
            recorded, effects, fresh = found
            self._projections.remember(fresh)
            outcomes[at] = Committed(recorded, effects)
        return outcomes
