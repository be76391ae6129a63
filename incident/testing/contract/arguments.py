"""The event store contract on bad arguments: a read's ``after`` and ids, an append's
expected version, aggregate name and idempotency key are refused the same way by every
store, as typed errors, with nothing written (see :mod:`incident.stores.arguments`)."""

from __future__ import annotations

from typing import Any

import pytest

from ... import errors
from ...examples.bank import BankAccount, MoneyDeposited
from ...stores import AppendRequest, EventStore
from .fixtures import StoreFixtures

__all__ = ["ArgumentsContract"]

# not an int >= 0: a negative one is no version (memory used to slice from the end, the
# others to report a hole), and None is not "from the start" (after=0 is)
BAD_AFTER = [-1, -100, True, False, 1.0, None, "1"]
# past any version or position a store can hold (Postgres keeps versions in 32 bits,
# every store positions in 64)
PAST_EVERY_VERSION = [2**31, 2**63 - 1, 2**63, 2**70]
NOT_AN_ID: list[Any] = [5, None, b"acc-1", ("acc-1",)]
BAD_NAMES: list[Any] = ["acc\x00", "acc\udc80", "\ud800", 3, b"acc"]
BAD_KEYS: list[Any] = ["k\x00", "k\udc80", "", 5, b"k", "k" * 2001, "\u00e9" * 1001]


def _reads(store: EventStore, aggregate_id: Any, after: Any) -> dict[str, Any]:
    """Each read of one stream, as a function of nothing, the lazy ones run through."""
    reads: dict[str, Any] = {
        "get": lambda: store.get(aggregate_id, after=after),
        "events": lambda: list(store.events(aggregate_id, after=after)),
    }
    if hasattr(store, "stream"):  # not in the protocol
        reads["stream"] = lambda: list(store.stream(aggregate_id, after=after))
    return reads


def _is_refusal(error: BaseException, word: str) -> bool:
    """A typed refusal naming the argument, not damage or a database failure."""
    return (
        isinstance(error, errors.IncidentError)
        and not isinstance(error, errors.CorruptEvent | errors.StoreError)
        and word in str(error)
    )


class ArgumentsContract(StoreFixtures):
    """Bad arguments to an event store's verbs: one typed error on every store."""

    @pytest.mark.parametrize("after", BAD_AFTER, ids=repr)
    def test_a_read_after_what_is_not_a_version_is_refused(
        self, event_store: EventStore, after: Any
    ) -> None:
        """``after`` is an int >= 0 on every read: anything else is an IncidentError
        naming it, never a slice from the end, a false CorruptEvent or a driver's error."""
        event_store.append(
            "acc-1", [MoneyDeposited(amount=n) for n in (1, 2, 3)], expected_version=0
        )
        reads = _reads(event_store, "acc-1", after)
        reads["read_all"] = lambda: list(event_store.read_all(after=after))
        reads["read_all with a limit"] = lambda: list(event_store.read_all(after=after, limit=2))
        for name, read in reads.items():
            with pytest.raises(errors.IncidentError) as caught:
                read()
            assert _is_refusal(caught.value, "after"), f"{name}: {caught.value!r}"

    @pytest.mark.parametrize("after", PAST_EVERY_VERSION, ids=repr)
    def test_a_read_after_every_version_is_empty(self, event_store: EventStore, after: int) -> None:
        """No event is after a version or position no store can hold: an empty read on
        every store (no OverflowError, no out-of-range StoreError)."""
        event_store.append("acc-1", [MoneyDeposited(amount=1)], expected_version=0)
        for name, read in _reads(event_store, "acc-1", after).items():
            assert read() == [], name
        assert list(event_store.read_all(after=after)) == []
        assert list(event_store.read_all(after=after, limit=2)) == []

    @pytest.mark.parametrize("aggregate_id", NOT_AN_ID, ids=repr)
    def test_a_read_of_an_id_that_is_not_a_str_is_refused(
        self, event_store: EventStore, aggregate_id: Any
    ) -> None:
        """A stream's id is a str: a read given anything else is an IncidentError naming
        it, on every store (memory used to find nothing, the others raised TypeError)."""
        reads = _reads(event_store, aggregate_id, 0)
        reads["version"] = lambda: event_store.version(aggregate_id)
        reads["projection get"] = lambda: event_store.projections().get(BankAccount, aggregate_id)
        for name, read in reads.items():
            with pytest.raises(errors.IncidentError) as caught:
                read()
            assert _is_refusal(caught.value, "aggregate_id"), f"{name}: {caught.value!r}"

    @pytest.mark.parametrize("expected", [2**31, 2**63, 2**70], ids=repr)
    def test_an_expected_version_past_every_version_is_a_conflict(
        self, event_store: EventStore, expected: int
    ) -> None:
        """No stream is at a version no store can hold: the append is a ConcurrencyError
        naming the stream's version, as any other stale version (Postgres used to raise
        an out-of-range StoreError), and writes nothing."""
        event_store.append("acc-1", [MoneyDeposited(amount=1)], expected_version=0)
        for events in ([MoneyDeposited(amount=2)], []):
            with pytest.raises(errors.ConcurrencyError) as caught:
                event_store.append("acc-1", events, expected_version=expected)
            assert (caught.value.expected, caught.value.actual) == (expected, 1)
        assert [r.position for r in event_store.read_all()] == [1]

    @pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
    def test_an_aggregate_name_no_store_can_keep_is_refused(
        self, event_store: EventStore, name: Any
    ) -> None:
        """The ``aggregate`` name is stored with every event, so it follows the rule ids
        follow (docs/storable.md): a NUL, a lone surrogate or a value that is not a str
        is Unstorable on every store, and nothing is written."""
        with pytest.raises(errors.Unstorable, match="aggregate") as caught:
            event_store.append(
                "acc-1", [MoneyDeposited(amount=1)], expected_version=0, aggregate=name
            )
        assert caught.value.what == "aggregate"
        assert list(event_store.read_all()) == []

    def test_an_idempotency_key_of_the_longest_kept_length_works(
        self, event_store: EventStore
    ) -> None:
        """A key of ``MAX_KEY_BYTES`` bytes in UTF-8 is stored and found on every store."""
        key = "\u00e9" * 1000  # 2,000 bytes
        request = AppendRequest(
            aggregate_id="acc-1",
            events=[MoneyDeposited(amount=1)],
            expected_version=0,
            idempotency_key=key,
        )
        event_store.commit(request, projection_store=event_store.projections())
        found = event_store.outcome_for(key)
        assert found is not None and [r.version for r in found.recorded] == [1]

    @pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
    def test_an_idempotency_key_no_store_can_keep_is_refused(
        self, event_store: EventStore, key: Any
    ) -> None:
        """An idempotency key is a non-empty str without NUL or lone surrogates: any
        other is Unstorable on every store, for an append and for a rejection, with
        nothing written; looking one up finds nothing (a key that is not a str is
        refused)."""
        # commit is the one append verb every store, sync or async, has
        request = AppendRequest(
            aggregate_id="acc-1",
            events=[MoneyDeposited(amount=1)],
            expected_version=0,
            idempotency_key=key,
        )
        with pytest.raises(errors.Unstorable, match="idempotency_key"):
            event_store.commit(request, projection_store=event_store.projections())
        with pytest.raises(errors.Unstorable, match="idempotency_key"):
            event_store.remember_rejection(key, "no")
        if isinstance(key, str):
            assert event_store.outcome_for(key) is None
        else:
            with pytest.raises(errors.IncidentError) as caught:
                event_store.outcome_for(key)
            assert _is_refusal(caught.value, "idempotency_key"), repr(caught.value)
        assert list(event_store.read_all()) == []
