"""The Postgres event store: reads (:mod:`.reads`) and the writes, where every append
is one transaction, numbered under the schema's append lock, predicted or locked
(:mod:`.prediction`), and resolved by its events' ids when the connection dies in it;
also idempotency keys' rejections, owed work, turns on a stream, and the waits for
appends (:mod:`.notify`)."""

# Long: choosing among an append's paths (alone and predicted, numbered by the database,
# locked) and looking up a commit whose reply was lost read best next to each other.

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import psycopg
from psycopg_pool import PoolTimeout

from ...codec import EventTypes
from ...errors import CommitUnknown, ConcurrencyError, DuplicateCommand, StoreError
from ...messages import ANY
from .._common import (
    AppendVerbs,
    effects_of,
    event_json,
    metadata_json,
    owed_row,
    project_elsewhere,
)
from ..arguments import (
    check_expected_version,
    check_key,
    check_owed,
    check_rejection,
    checked_request,
)
from ..live import Live
from ..protocols import (
    AppendRequest,
    CommitCall,
    Committed,
    Outcome,
    Owed,
    ProjectFn,
    ProjectionStore,
)
from .append_job import AppendJob, Committing, Written
from .batch import BatchAppends
from .checkpoints import PostgresCheckpointStore
from .database import Database
from .durability import ASYNC_COMMIT, FLUSHED, WAL_POSITIONS, durable_rows
from .notify import Listener, channel_for
from .numbered import NumberedAppends
from .plans import run
from .predicted import PredictedAppends, rows_plan
from .prediction import Predictor
from .projections import PostgresProjectionStore, writes_into
from .reads import PostgresEventReads
from .session import (
    Connection,
    after_commit,
    fetch_value,
    first_line,
    give_turn,
    lock_key,
    log,
    may_hide_a_commit,
    one_sync_transaction,
    take_turn,
)
from .thread_batches import ThreadBatches

MAX_VERSION = 2**31 - 1  # the events table's version column is an integer


class PostgresEventStore(PostgresEventReads, AppendVerbs, Live):
    """The event log in one Postgres table; thread-safe, many processes may share it.

    Positions are gapless and in commit order. A bigserial is neither: a sequence value
    is taken when a row is inserted, not when its transaction commits, so a transaction
    that took 7 can commit after one that took 8, and a reader tailing the log that has
    already seen 8 never looks back for 7 (and rolled-back transactions leave holes).
    So every append takes a transaction-scoped advisory lock (one per schema) before it
    reads the last position, and holds it until its commit: appends to one schema commit
    one at a time, each numbered after the last committed one, and a reader's snapshot
    always holds a gapless prefix of the log. The lock is taken in a statement of its
    own: under READ COMMITTED each statement takes a fresh snapshot, so the statement
    after the lock sees every append committed before it was granted.

    Reading the heads under the lock costs a round trip before the rows can be sent. A
    store that wrote the last position it knows of predicts the heads instead (the
    caller's expected version, its own last position) and sends the lock, a check of
    that prediction and the rows in one round trip; a wrong prediction rolls back and
    the append is done again the locked way (see ``Predictor``).
    """

    def __init__(self, db: Database, *, types: EventTypes | None = None, batch_size: int) -> None:
        super().__init__(db, types=types, batch_size=batch_size)
        self._projections = PostgresProjectionStore(db)
        self._predictor = Predictor()
        # appends NOTIFY this channel as they commit; subscribers LISTEN instead of polling
        self.channel = channel_for(db.schema)
        self.numbered = NumberedAppends(db, self._sql, self._projections)
        self.predicted = PredictedAppends(
            db, self._sql, self._projections, self._predictor, self.channel
        )
        self.batch_appends = BatchAppends(
            db,
            self._sql,
            self._projections,
            self._predictor,
            self.channel,
            self.look_up_sent,
        )
        #: concurrent commits of this process's threads share a transaction
        self.thread_batches: ThreadBatches[tuple[AppendJob, CommitCall], Committed] = ThreadBatches(
            lambda item: self._commit_job(*item), self._commit_together, _interrupted
        )
        #: the async store hands this store its tasks' concurrent commits together
        self.shares_commits = True
        self._listener = Listener(db.conninfo, self.channel)

    def __repr__(self) -> str:
        return f"PostgresEventStore({self._db.describe()})"

    @property
    def predictor(self) -> Predictor:
        """This process's guess of the log's last position (:mod:`.prediction`)."""
        return self._predictor

    def commit(
        self,
        request: AppendRequest,
        *,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> Committed:
        call = CommitCall(request, projection_store, project)
        job = self.prepare(call)
        if isinstance(job, Committed):
            return job
        # a batch would write a keyed append alone anyway; a thread in a turn holds a
        # connection already, which a batch's writer might otherwise wait for in the pool
        if request.idempotency_key is not None or getattr(self._db.pinned, "conn", None):
            return self._commit_job(job, call)
        return self.thread_batches.commit((job, call))

    def _commit_job(self, job: AppendJob, call: CommitCall) -> Committed:
        recorded, effects, fresh = self._append_resolved(job)
        self._projections.remember(fresh)
        committed = Committed(recorded, effects)
        project_elsewhere(committed, call.projection_store, job.shared)
        return committed

    def commit_many(self, calls: Sequence[CommitCall]) -> list[Committed | Exception]:
        """Appends without an idempotency key go in one transaction (:mod:`.batch`), the
        others, and any the batch could not write, one by one; each its own outcome."""
        # checked and encoded once, however each goes
        prepared, outcomes = self.prepare_many(calls, lambda c: c.request.idempotency_key is None)
        if len(prepared) > 1:
            places = list(prepared)
            together = self._commit_together([(prepared[at], calls[at]) for at in places])
            outcomes.update(zip(places, together, strict=True))
        results: list[Committed | Exception] = []
        for at, call in enumerate(calls):
            outcome = outcomes.get(at)
            if outcome is None:
                ready = prepared.get(at)
                try:
                    outcome = (
                        self._commit_job(ready, call)
                        if ready is not None
                        else self.commit(
                            call.request,
                            projection_store=call.projection_store,
                            project=call.project,
                        )
                    )
                except Exception as error:
                    outcome = error
            results.append(outcome)
        return results

    def _commit_together(
        self,
        items: list[tuple[AppendJob, CommitCall]],
        committed: Callable[[], None] | None = None,
    ) -> list[Committed | Exception]:
        """Prepared appends in one transaction (``committed`` as for
        ``BatchAppends.append``); those the batch could not write (a row the server
        refused, a lost connection with nothing stored) go one by one."""
        jobs = list(enumerate(job for job, _ in items))
        outcomes = self.batch_appends.append(jobs, committed)
        results: list[Committed | Exception] = []
        for at, (job, call) in enumerate(items):
            outcome = outcomes.get(at)
            try:
                if outcome is None:
                    outcome = self._commit_job(job, call)
                elif isinstance(outcome, Committed):
                    project_elsewhere(outcome, call.projection_store, job.shared)
            except Exception as error:
                outcome = error
            results.append(outcome)
        return results

    def _shared(self, call: CommitCall) -> bool:
        store = call.projection_store
        return store is not None and self.shares_database_with(store)

    def prepare_many(
        self, calls: Sequence[CommitCall], takes: Callable[[CommitCall], bool]
    ) -> tuple[dict[int, AppendJob], dict[int, Committed | Exception]]:
        """The calls ``takes`` accepts, prepared, by their place in ``calls``; and the
        outcomes of those already decided (refused, or no events to write)."""
        prepared: dict[int, AppendJob] = {}
        outcomes: dict[int, Committed | Exception] = {}
        for at, call in enumerate(calls):
            if not takes(call):
                continue
            try:
                job = self.prepare(call)
            except Exception as error:  # refused before the database is touched
                outcomes[at] = error
                continue
            if isinstance(job, AppendJob):
                prepared[at] = job
            else:
                outcomes[at] = job
        return prepared, outcomes

    def prepare(self, call: CommitCall) -> AppendJob | Committed:
        """The append checked and encoded (everything that can be refused is refused
        before the database is touched), or, with no events, its Committed."""
        request = call.request
        aggregate_id, expected_version = request.aggregate_id, request.expected_version
        batch = checked_request(request)
        payloads = [event_json(event)[0] for event in batch]
        # past the version column's range no stream can be at it: the stream's version
        # says so, as on every store, where the server would refuse the number
        if not batch or (expected_version is not ANY and expected_version > MAX_VERSION):
            key = request.idempotency_key
            if batch and key is not None and (earlier := self.outcome_for(key)) is not None:
                raise DuplicateCommand(key, *earlier)  # as the append would have
            if expected_version is not ANY:
                check_expected_version(aggregate_id, expected_version, self.version(aggregate_id))
            return Committed([])
        job = AppendJob(
            request,
            batch,
            payloads,
            metadata_json(request.metadata),
            call.project,
            shared=self._shared(call),
        )
        self._db.ready()
        return job

    def _append_resolved(self, job: AppendJob) -> Written:
        """Append; when the connection dies during it, find out whether it committed
        rather than leave the caller guessing. Found: what was stored. Not found:
        nothing was written, so the same append (same expected version) is tried once
        more, on a new connection. Not knowable in time: CommitUnknown."""
        doing = f"appending {len(job.events)} event(s) to {job.request.aggregate_id!r}"
        for attempt in range(2):
            job.sent.clear()
            used: list[Connection] = []
            try:
                # a turn's connection that died stays dead: the second try takes another
                with self._db.connection(doing, fresh=attempt > 0) as conn:
                    used.append(conn)
                    return self._append_once(conn, job)
            except StoreError as error:
                if not (used and may_hide_a_commit(used[0], error.__cause__)):
                    raise  # the server answered: it said what happened
                stored = self.look_up_sent(job, doing, error)
                if stored is not None:
                    log.info("incident: %s: the connection was lost, not the commit", doing)
                    return stored
                log.info("incident: %s: the connection was lost, nothing was stored", doing)
                if attempt > 0:
                    raise StoreError(
                        f"Postgres failed {doing}: the connection was lost twice and "
                        "nothing was stored (looked up); it is safe to try again"
                    ) from error.__cause__
        raise AssertionError("unreachable")  # pragma: no cover

    def _append_once(self, conn: Connection, job: AppendJob) -> Written:
        try:
            # while predicting, this process's appends take turns so each one's guess
            # holds; while others are writing, they queue for the lock in the server
            with self._db.in_flight.one() as alone:
                committing = None
                if alone and self._predictor.predicting:  # see InFlight
                    with self._db.append_turns:
                        committing = self._append_predicted(conn, job, synchronous=True)
                        if committing is not None:
                            self._predictor.committed(committing[0][0][-1].position)
                committing = committing or self.numbered.append(conn, job, self.channel)
            if committing is None:  # numbered here: its inline work looks at positions
                turn = self._db.append_turns if self._predictor.predicting else nullcontext()
                with turn:
                    committing = self._append_predicted(conn, job) or self._append_locked(conn, job)
                    self._predictor.committed(committing[0][0][-1].position)
            written, positions = committing
            # committed, not yet acknowledged: only once its WAL is flushed (shared with
            # every append that committed meanwhile), outside the turn and the lock
            try:
                self._db.durability.after(positions, conn)
            except psycopg.Error as error:  # stored all the same: looked up, never resent
                raise after_commit(conn, error) from None
        except DuplicateCommand:
            # what the key stored may still be in flight: say so only once it is durable
            self._db.durability.after(conn.execute(WAL_POSITIONS).fetchone(), conn)
            raise
        except psycopg.errors.UniqueViolation as error:
            # only a writer that bypassed the lock could get here; still a clean conflict
            if error.diag.constraint_name != "events_stream_version":
                raise
            actual = fetch_value(conn, self._sql.version, job.request.aggregate_id)
            raise ConcurrencyError(
                job.request.aggregate_id, job.request.expected_version, actual
            ) from error
        return written

    def look_up_sent(self, job: AppendJob, doing: str, lost: StoreError) -> Written | None:
        """After a lost connection: the append as stored, or None when it was not (its
        transaction's rows are all there or none is). Event ids are made here, before
        sending, and unique in the table. Connections are asked for until the pool's
        timeout has passed; then CommitUnknown."""
        if not job.sent:
            return None  # no row was sent: there was nothing to commit
        recorded, effects, fresh = job.sent[-1]  # an earlier try rolled back
        ids = [record.event_id for record in recorded]
        deadline = time.monotonic() + max(float(self._db.pool.timeout), 1.0)
        seen: BaseException = lost.__cause__ or lost
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                with self._db.pool.connection(timeout=remaining) as conn:
                    rows = durable_rows(conn, self._db.durability, self._sql.by_ids, [ids])
            except psycopg.Error as error:
                seen = error
                if not isinstance(error, PoolTimeout):
                    self._db.lost(error)
                time.sleep(min(0.05, max(remaining, 0)))
                continue
            if not rows:
                return None
            stored = self._envelopes(rows)
            self._predictor.committed(stored[-1].position)
            if effects.owed:  # owed work holds its cause's envelope: the one stored
                effects = effects_of(job.project, stored, checked=not job.shared)
            return stored, effects, fresh
        raise CommitUnknown(
            f"Postgres lost the connection {doing} ({first_line(lost.__cause__ or lost)})"
            f" and could not find out whether it committed ({first_line(seen)})",
            aggregate_id=job.request.aggregate_id,
            event_ids=ids,
        ) from lost.__cause__

    @contextmanager
    def turn(self, aggregate_id: str) -> Iterator[None]:
        """``with store.turn(stream):`` read the stream, decide and append while writers
        of every process that take the same turn wait in the server: a session-level
        advisory lock per stream, on a pooled connection that this thread's calls to
        the store use until the block ends, so the turn costs no second connection.

        CommandHandler takes it on the streams its process has collided on, so writers
        that keep colliding queue instead of spending their retries; an uncontended
        stream never takes it. The lock is released when the block ends, however it
        ends (or the session is closed, which releases it too). A turn taken inside a
        turn takes nothing more: one stream lock per session, so no two writers can
        each hold one stream and wait for the other's."""
        db = self._db
        if getattr(db.pinned, "conn", None) is not None:
            yield
            return
        db.ready()
        key = lock_key(db.schema, f"stream {aggregate_id}")
        with db.connection(f"taking the turn on {aggregate_id!r}") as conn:
            taken = take_turn(conn, key)
            db.pinned.conn = conn
            try:
                yield
            finally:
                db.pinned.conn = None
                if taken:
                    give_turn(conn, key)

    def _append_locked(self, conn: Connection, job: AppendJob) -> Committing:
        """Take the lock and read the heads, then write and commit: two round trips."""
        with one_sync_transaction(conn, then=WAL_POSITIONS) as afterwards:
            conn.execute(ASYNC_COMMIT)  # the lock is let go before the flush: see wait()
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._db.append_lock])
            heads = conn.execute(self._sql.heads, [job.request.aggregate_id])
            if job.request.idempotency_key is not None:
                earlier = self._outcome(conn, job.request.idempotency_key)
                if earlier is not None:
                    raise DuplicateCommand(job.request.idempotency_key, *earlier)
            version, last_position = heads.fetchone()  # type: ignore[misc]
            self._predictor.observed(last_position)
            check_expected_version(job.request.aggregate_id, job.request.expected_version, version)
            written = run(
                conn,
                rows_plan(self._sql, self._projections, job, version, last_position),
                self._projections,
            )
            # delivered when (and only if) this transaction commits
            new_last = str(written[0][-1].position)
            conn.execute("SELECT pg_notify(%s, %s)", [self.channel, new_last])
        return written, afterwards.row

    def _append_predicted(
        self, conn: Connection, job: AppendJob, *, synchronous: bool = False
    ) -> Committing | None:
        """The lock, a check of the heads this process expects and the writes in one
        round trip (:mod:`.predicted`): right whenever nobody else has appended since,
        as with a single writer. A stream at another version is a ConcurrencyError at
        once; another writer's append, or a used key, returns None (nothing written)
        for the locked path to append, or to say what the key stored."""
        plan = self.predicted.plan(job, synchronous=synchronous)
        if plan is None:
            return None
        try:
            then = FLUSHED if synchronous else WAL_POSITIONS
            with one_sync_transaction(conn, then=then) as afterwards:
                written = run(conn, plan, self._projections)
        except psycopg.Error as error:
            if self.predicted.declined(job, error):
                return None
            raise
        return written, afterwards.row

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        """Under the append lock, like an append's key, so the two cannot both win. What
        the key stored is returned once durable, as by ``outcome_for``: an append's may
        still be in flight, and finding it leaves nothing of this commit's own to flush."""
        check_key(idempotency_key)
        check_rejection(reason, detail)
        self._db.ready()
        doing = f"remembering the rejection of idempotency key {idempotency_key!r}"
        with self._db.connection(doing) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._db.append_lock])
                conn.execute(self._sql.remember_rejection, [idempotency_key, reason, detail])
            stored = self._outcome(conn, idempotency_key)
            self._db.durability.after(conn.execute(WAL_POSITIONS).fetchone(), conn)
        assert stored is not None  # inserted, or there already
        return stored

    def owe(self, owed: Owed) -> None:
        check_owed(owed)
        self._db.ready()
        with self._db.connection(f"recording the work {owed.handler} owes") as conn:
            conn.execute(self._sql.owe, owed_row(owed))

    def settle(self, handler: str, position: int) -> None:
        self._db.ready()
        with self._db.connection(f"settling the work {handler} owed") as conn:
            conn.execute(self._sql.settle, [handler, position])

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return writes_into(self._db, projection_store)

    def initialize(self) -> list[str]:
        return self._db.initialize()

    def projections(self) -> PostgresProjectionStore:
        return self._projections

    def checkpoints(self) -> PostgresCheckpointStore:
        """Subscription checkpoints in this schema (beside the projections: one commit)."""
        return PostgresCheckpointStore(self._db)

    def wait_for_append(self, after: int, timeout: float) -> bool:
        """Wait for an append's NOTIFY; the store's waiting threads share one LISTEN
        connection (see ``Listener``)."""
        try:
            return self._listener.wait(timeout, lambda: self.last_position() > after)
        except psycopg.Error as error:
            raise StoreError(f"Postgres failed waiting for appends: {error}") from error

    def close(self) -> None:
        """Closes the pool, which this store's projections() share, and the LISTEN
        connection."""
        self._listener.close()
        self._db.close()


def _interrupted(item: tuple[AppendJob, CommitCall], error: BaseException) -> Exception:
    """What a thread is told when the thread writing its batch was interrupted."""
    job = item[0]
    problem = f"the thread committing a batch with this append was interrupted ({error!r})"
    if not job.sent:
        return StoreError(f"{problem} before anything of it was sent; nothing was stored")
    ids = [record.event_id for record in job.sent[-1][0]]
    return CommitUnknown(problem, job.request.aggregate_id, ids)
