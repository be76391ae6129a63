"""The checkpoint store contract: compare-and-set checkpoints, dead letters and the lock
that lets one runner at a time handle a subscription."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest

from ...errors import CheckpointConflict, IncidentError
from ...examples.bank import BankAccount
from ...messages import Projection
from ...stores import CheckpointStore, MemoryProjectionStore, Parked, ProjectionStore
from .fixtures import StoreFixtures
from .other_database import ElsewhereProjections, UnreplaceableProjections
from .projection_store import Reading, account_row

__all__ = ["CheckpointStoreContract", "parked_event"]


def parked_event(
    handler: str, position: int, *, error: str = "RuntimeError: boom", attempts: int = 1
) -> Parked:
    """A dead letter of ``handler`` for the event at ``position``."""
    return Parked(
        handler=handler,
        position=position,
        event_id=str(uuid.UUID(int=position, version=4)),
        aggregate_id=f"acc-{position}",
        event_type="MoneyDeposited",
        error=error,
        attempts=attempts,
        parked_at=dt.datetime(2024, 5, 1, 7, 8, position % 60, tzinfo=dt.UTC),
    )


class CheckpointStoreContract(StoreFixtures):
    """What every :class:`~incident.stores.CheckpointStore` does: checkpoints that move
    by compare-and-set (a batch's projections with them, in one transaction when they
    share its database), dead letters per handler in position order, and handler locks
    that exclude each other. Its tests take the ``checkpoint_store`` and
    ``projection_store`` fixtures."""

    def test_a_handler_starts_at_zero(self, checkpoint_store: CheckpointStore) -> None:
        assert checkpoint_store.load("h") == 0
        assert "h" not in checkpoint_store.checkpoints()

    def test_checkpoints_move_by_compare_and_set(self, checkpoint_store: CheckpointStore) -> None:
        """A save that expects a checkpoint another runner has moved writes nothing."""
        checkpoint_store.save("h", 5, expected=0)
        with pytest.raises(CheckpointConflict, match="at 5, expected 0") as caught:
            checkpoint_store.save("h", 7, expected=0)
        assert (caught.value.handler, caught.value.expected, caught.value.actual) == ("h", 0, 5)
        assert checkpoint_store.load("h") == 5
        assert checkpoint_store.checkpoints()["h"] == 5
        checkpoint_store.save("h", 7, expected=5)
        assert checkpoint_store.load("h") == 7

    def test_each_handler_keeps_its_own_checkpoint(self, checkpoint_store: CheckpointStore) -> None:
        checkpoint_store.save("a", 3, expected=0)
        checkpoint_store.save("b", 7, expected=0)
        checkpoint_store.save("a", 4, expected=3)
        assert checkpoint_store.checkpoints() == {"a": 4, "b": 7}
        assert (checkpoint_store.load("a"), checkpoint_store.load("b")) == (4, 7)

    def test_reset_sets_the_checkpoint_whatever_it_was(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """A replay resets unconditionally: back to 0, or on to any position; the next
        save expects the position reset to."""
        checkpoint_store.save("h", 5, expected=0)
        checkpoint_store.reset("h")
        assert checkpoint_store.load("h") == 0
        checkpoint_store.reset("h", 9)
        assert checkpoint_store.load("h") == 9
        checkpoint_store.reset("new", 4)
        assert checkpoint_store.checkpoints() == {"h": 9, "new": 4}
        checkpoint_store.save("h", 10, expected=9)
        assert checkpoint_store.load("h") == 10

    def test_a_reset_can_drop_the_handlers_dead_letters(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """``reset(drop_parked=True)`` (a replay, which handled every event) empties the
        handler's dead letters with the checkpoint; other handlers keep theirs, and a
        plain reset drops none."""
        for handler, position in [("h", 2), ("h", 5), ("other", 3)]:
            checkpoint_store.park(parked_event(handler, position))
        checkpoint_store.reset("h", 4)
        assert [p.position for p in checkpoint_store.parked("h")] == [2, 5]
        checkpoint_store.reset("h", 9, drop_parked=True)
        assert (checkpoint_store.load("h"), checkpoint_store.parked("h")) == (9, [])
        assert [p.position for p in checkpoint_store.parked("other")] == [3]

    def test_a_reset_swaps_tables_with_the_checkpoint(
        self, checkpoint_store: CheckpointStore, projection_store: ProjectionStore
    ) -> None:
        """``reset(tables=...)`` replaces each given table by its rows (an older version
        than the stored one included: a replay's rows win) and sets the checkpoint;
        tables not given keep their rows."""
        for row in [
            account_row("A", version=5, balance=50),
            account_row("B", version=1, balance=1),
        ]:
            projection_store.project(row)
        projection_store.project(Reading(aggregate_id="kept", count=1))
        checkpoint_store.park(parked_event("h", 2))
        rebuilt = account_row("A", version=2, balance=20)
        checkpoint_store.reset(
            "h",
            7,
            drop_parked=True,
            tables={BankAccount: [rebuilt]},
            projection_store=projection_store,
        )
        assert projection_store.all(BankAccount) == [rebuilt]
        assert [r.aggregate_id for r in projection_store.all(Reading)] == ["kept"]
        assert (checkpoint_store.load("h"), checkpoint_store.parked("h")) == (7, [])

    def test_a_reset_whose_rows_cannot_be_written_changes_nothing(
        self, checkpoint_store: CheckpointStore, projection_store: ProjectionStore
    ) -> None:
        """A row of any table that cannot be kept fails the reset (an IncidentError: the
        Postgres server refuses this one, a StoreError) and, in a shared database, leaves
        every table, the checkpoint and the dead letters as they were."""
        old = account_row("A", version=1, balance=10)
        projection_store.project(old)
        checkpoint_store.save("h", 3, expected=0, parked=[parked_event("h", 2)])
        tables: dict[type[Projection], list[Projection]] = {
            BankAccount: [account_row("B", version=1, balance=20)],
            Reading: [Reading(aggregate_id="bad", count=2**63)],
        }
        with pytest.raises(IncidentError):
            checkpoint_store.reset(
                "h", 9, drop_parked=True, tables=tables, projection_store=projection_store
            )
        if checkpoint_store.shares_database_with(projection_store):
            assert projection_store.all(BankAccount) == [old]
            assert projection_store.all(Reading) == []
            assert checkpoint_store.load("h") == 3
            assert [p.position for p in checkpoint_store.parked("h")] == [2]

    def test_a_reset_moves_the_checkpoint_before_tables_in_another_database(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """With the read models elsewhere, the checkpoint and the emptied dead letters
        commit first, then each table is swapped: killed in between, the runner goes on
        from the end of the replay with nothing to retry, never writing a replayed
        event's older row again (``incident.stores.replacing``)."""
        checkpoint_store.park(parked_event("h", 2))
        rows: dict[type[Projection], list[Projection]] = {
            BankAccount: [account_row("A", version=1, balance=10)],
            Reading: [Reading(aggregate_id="r")],
        }
        elsewhere = ElsewhereProjections(checkpoint_store)
        checkpoint_store.reset("h", 9, drop_parked=True, tables=rows, projection_store=elsewhere)
        assert elsewhere.seen == [("BankAccount", 9, 0), ("Reading", 9, 0)]
        assert elsewhere.all(BankAccount) == rows[BankAccount]
        failing = ElsewhereProjections(checkpoint_store, fail=True)
        checkpoint_store.park(parked_event("h", 4))
        with pytest.raises(RuntimeError, match="killed"):
            checkpoint_store.reset("h", 12, drop_parked=True, tables=rows, projection_store=failing)
        assert (checkpoint_store.load("h"), checkpoint_store.parked("h")) == (12, [])
        assert failing.all(BankAccount) == []

    def test_a_reset_refuses_tables_it_cannot_write(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """Tables without a projection store, or for one elsewhere that cannot replace
        tables, are refused (IncidentError) before anything is written."""
        checkpoint_store.save("h", 3, expected=0, parked=[parked_event("h", 2)])
        rows: dict[type[Projection], list[Projection]] = {
            BankAccount: [account_row("A", version=1, balance=1)]
        }
        with pytest.raises(IncidentError, match="no projection_store"):
            checkpoint_store.reset("h", 9, drop_parked=True, tables=rows)
        with pytest.raises(IncidentError, match="cannot replace tables"):
            checkpoint_store.reset(
                "h", 9, drop_parked=True, tables=rows, projection_store=UnreplaceableProjections()
            )
        assert checkpoint_store.load("h") == 3
        assert [p.position for p in checkpoint_store.parked("h")] == [2]

    def test_initialize_is_idempotent(self, checkpoint_store: CheckpointStore) -> None:
        """The first initialize says what it made; the next has nothing to do."""
        assert all(isinstance(line, str) for line in checkpoint_store.initialize())
        assert checkpoint_store.initialize() == []

    # -- dead letters ---------------------------------------------------------------------

    def test_parked_events_come_back_in_position_order(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """parked(handler) lists that handler's dead letters, equal to what was parked, in
        position order whatever order they were parked in; parked() lists every
        handler's, each handler's in position order."""
        events = [parked_event("h1", 5), parked_event("h2", 3), parked_event("h1", 2)]
        for parked in events:
            checkpoint_store.park(parked)
        assert checkpoint_store.parked("h1") == [events[2], events[0]]
        assert checkpoint_store.parked("h2") == [events[1]]
        assert checkpoint_store.parked("nobody") == []
        everything = checkpoint_store.parked()
        assert sorted(everything, key=lambda p: (p.handler, p.position)) == [
            events[2],
            events[0],
            events[1],
        ]
        assert [p.position for p in everything if p.handler == "h1"] == [2, 5]

    def test_parking_an_event_again_replaces_its_record(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """A retry that fails again parks the event again: one record, the last error."""
        checkpoint_store.park(parked_event("h", 2, error="first", attempts=1))
        again = parked_event("h", 2, error="second", attempts=4)
        checkpoint_store.park(again)
        assert checkpoint_store.parked("h") == [again]

    def test_a_held_event_stays_held(self, checkpoint_store: CheckpointStore) -> None:
        """An event parked behind its stream's failure (attempts 0) reads back held."""
        checkpoint_store.park(parked_event("h", 2))
        checkpoint_store.park(parked_event("h", 3, error="held behind #2", attempts=0))
        assert [p.held for p in checkpoint_store.parked("h")] == [False, True]

    def test_unpark_removes_one_event_of_one_handler(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        for handler, position in [("h", 2), ("h", 3), ("other", 2)]:
            checkpoint_store.park(parked_event(handler, position))
        checkpoint_store.unpark("h", 2)
        assert [p.position for p in checkpoint_store.parked("h")] == [3]
        assert [p.position for p in checkpoint_store.parked("other")] == [2]
        checkpoint_store.unpark("h", 99)  # not parked: nothing to do
        checkpoint_store.unpark("h", 3)
        assert checkpoint_store.parked("h") == []

    def test_a_batch_parks_with_its_checkpoint(self, checkpoint_store: CheckpointStore) -> None:
        """``save(parked=...)`` writes the batch's dead letters with the checkpoint (one
        already there is replaced); a save that loses the compare-and-set writes none."""
        checkpoint_store.park(parked_event("h", 2, error="first"))
        batch = [parked_event("h", 2, error="again", attempts=2), parked_event("h", 4)]
        checkpoint_store.save("h", 4, expected=0, parked=batch)
        assert checkpoint_store.parked("h") == batch
        with pytest.raises(CheckpointConflict):
            checkpoint_store.save("h", 9, expected=0, parked=[parked_event("h", 7)])
        assert checkpoint_store.parked("h") == batch
        assert checkpoint_store.load("h") == 4

    # -- handler locks ----------------------------------------------------------------------

    def test_a_lock_excludes_every_other_lock_of_its_handler(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """Two lock objects of one handler (two runners): while one holds it the other's
        attempts fail, with or without a wait; once released, the other gets it. Other
        handlers' locks are unaffected."""
        holder, standby = checkpoint_store.lock("h"), checkpoint_store.lock("h")
        other = checkpoint_store.lock("other")
        try:
            assert holder.handler == standby.handler == "h"
            assert not holder.held()
            assert holder.acquire(timeout=0)
            assert holder.held()
            assert holder.acquire(timeout=0)  # already ours
            assert not standby.acquire(timeout=0)
            assert not standby.acquire(timeout=0.05)
            assert not standby.held()
            assert other.acquire(timeout=0)
            holder.release()
            assert not holder.held()
            assert standby.acquire(timeout=5)
            assert standby.held()
            assert not holder.acquire(timeout=0)
        finally:
            for lock in (holder, standby, other):
                lock.release()

    def test_a_waiting_acquire_gets_the_lock_once_it_is_released(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        holder, standby = checkpoint_store.lock("h"), checkpoint_store.lock("h")
        assert holder.acquire(timeout=0)
        releaser = threading.Timer(0.1, holder.release)
        releaser.start()
        try:
            assert standby.acquire(timeout=10)
        finally:
            releaser.join()
            standby.release()
            holder.release()

    def test_releasing_a_lock_not_held_does_nothing(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """A runner stopping as a standby releases a lock it never got; twice is fine."""
        lock = checkpoint_store.lock("h")
        lock.release()
        assert lock.acquire(timeout=0)
        lock.release()
        lock.release()
        assert not lock.held()

    # -- a batch's projections with its checkpoint -------------------------------------------

    def test_a_batch_and_its_checkpoint_are_saved_together(
        self, checkpoint_store: CheckpointStore, projection_store: ProjectionStore
    ) -> None:
        """save() writes the projections and moves the checkpoint. A stale save raises
        CheckpointConflict; when the projection store shares the checkpoint store's
        database, it wrote none of its projections either (one transaction)."""
        first = account_row("A", version=1, balance=10)
        checkpoint_store.save(
            "h", 1, expected=0, projections=[first], projection_store=projection_store
        )
        assert checkpoint_store.load("h") == 1
        assert projection_store.get(BankAccount, "A") == first
        stale = account_row("B", version=1, balance=20)
        with pytest.raises(CheckpointConflict):
            checkpoint_store.save(
                "h", 2, expected=0, projections=[stale], projection_store=projection_store
            )
        assert checkpoint_store.load("h") == 1
        if checkpoint_store.shares_database_with(projection_store):
            assert projection_store.get(BankAccount, "B") is None

    def test_a_batch_that_cannot_be_written_moves_no_checkpoint(
        self, checkpoint_store: CheckpointStore, projection_store: ProjectionStore
    ) -> None:
        """One projection a store cannot keep fails the save with an IncidentError (the
        Postgres checkpoint store lets the server refuse it, a StoreError; the others say
        Unstorable): the checkpoint stays; in a shared database, the batch's other
        projections are not written either."""
        batch = [Reading(aggregate_id="ok", count=1), Reading(aggregate_id="bad", count=2**63)]
        with pytest.raises(IncidentError):
            checkpoint_store.save(
                "h",
                2,
                expected=0,
                projections=batch,
                projection_store=projection_store,
                parked=[parked_event("h", 2)],
            )
        assert checkpoint_store.load("h") == 0
        assert checkpoint_store.parked("h") == []  # the batch's dead letters neither
        if checkpoint_store.shares_database_with(projection_store):
            assert projection_store.get(Reading, "ok") is None

    def test_a_batch_for_read_models_in_another_database_is_written_there(
        self, checkpoint_store: CheckpointStore
    ) -> None:
        """With the read models elsewhere (a memory store here), the projections land
        there and the checkpoint moves."""
        elsewhere = MemoryProjectionStore()
        row = account_row("A", version=1, balance=10)
        checkpoint_store.save("h", 1, expected=0, projections=[row], projection_store=elsewhere)
        assert elsewhere.get(BankAccount, "A") == row
        assert checkpoint_store.load("h") == 1
