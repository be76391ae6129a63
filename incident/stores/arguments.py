"""What every store checks of the arguments its verbs are given, before it reads or
writes anything: one place, so a bad argument is the same typed error on every backend,
sync or async, and never a driver's TypeError, an OverflowError, a StoreError or a
false CorruptEvent.

- Reads: ``after`` is a version or position, an int >= 0 (not a bool, and not None:
  ``after=0`` reads from the start); ``limit`` is None or an int >= 0; an id or an
  idempotency key that is not a str is refused. All three are IncidentErrors. A str no
  store could keep (see :func:`incident.storable.keepable_id`) reads as nothing: no
  stream or key can have it.
- Writes: the aggregate id, the ``aggregate`` name and the idempotency key are refused
  as Unstorable when no store could keep them (docs/storable.md), so is metadata that
  is not a mapping; ``expected_version`` is ``incident.ANY`` or an int >= 0 and each
  event an Event (else InvalidArgument), and a stream not at it is a ConcurrencyError.
  Owed work (``owe``, and an append's Effects) is refused as InvalidArgument unless
  every store can keep each of its fields as given (:func:`check_owed`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from .. import storable
from ..errors import ConcurrencyError, InvalidArgument, Unstorable
from ..messages import ANY, Event
from .protocols import AppendRequest, Owed, Parked
from .unnumbered import Unnumbered

__all__ = [
    "check_after",
    "check_aggregate_name",
    "check_expected_version",
    "check_key",
    "check_limit",
    "check_owed",
    "check_parked",
    "checked_events",
    "checked_request",
    "check_version_argument",
    "readable_id",
    "readable_key",
]


def check_limit(limit: int | None) -> None:
    """``read_all``'s limit is None or a count: a negative one is refused, not read as
    "nothing"."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidArgument(f"limit must be None or an int >= 0, got {storable.shown(limit)}")


def check_after(after: object) -> int:
    """``after`` as a read passes it on: refused unless an int >= 0. Past the largest
    version or position a store can hold (signed 64 bits) there is nothing to read on
    any store; it is capped there so no driver overflows.

    >>> check_after(3), check_after(2**70) == 2**63 - 1
    (3, True)
    """
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InvalidArgument(f"after must be an int >= 0, got {storable.shown(after)}")
    return min(after, storable.INT64_MAX)


def readable_id(aggregate_id: object) -> bool:
    """Whether a stream can have this id; a read of one that cannot is empty. An id that
    is not a str is refused."""
    if not isinstance(aggregate_id, str):
        raise InvalidArgument(f"aggregate_id must be a str, got {storable.shown(aggregate_id)}")
    return storable.keepable_id(aggregate_id)


def readable_key(key: object) -> bool:
    """Whether an idempotency key can have been stored (``check_key`` accepts it); a
    lookup of one that cannot finds nothing. A key that is not a str is refused."""
    if not isinstance(key, str):
        raise InvalidArgument(f"idempotency_key must be a str, got {storable.shown(key)}")
    return bool(key) and storable.problem_in(key) is None and _fits(key)


def _fits(key: str) -> bool:
    return len(key) * 4 <= storable.MAX_KEY_BYTES or (len(key.encode()) <= storable.MAX_KEY_BYTES)


def check_key(key: object) -> str:
    """An idempotency key every store keeps as it is: a non-empty str without NUL or
    lone surrogates, of at most ``MAX_KEY_BYTES`` in UTF-8."""
    if not isinstance(key, str) or not key:
        raise Unstorable(
            "idempotency_key", None, f"must be a non-empty str, got {storable.shown(key)}"
        )
    if (problem := storable.problem_in(key)) is not None:
        raise Unstorable("idempotency_key", None, problem[1])
    if not _fits(key):
        raise Unstorable(
            "idempotency_key",
            None,
            f"is {len(key.encode())} bytes in UTF-8, longer than {storable.MAX_KEY_BYTES}",
        )
    return key


def check_aggregate_name(name: object) -> None:
    """The ``aggregate`` name stored with each event: None or a str without NUL or lone
    surrogates ("" is None: both are stored as "")."""
    if name is None:
        return
    if not isinstance(name, str):
        raise Unstorable("aggregate", None, f"must be a str or None, got {storable.shown(name)}")
    if (problem := storable.problem_in(name)) is not None:
        raise Unstorable("aggregate", None, problem[1])


def check_expected_version(aggregate_id: str, expected: object, actual: int) -> None:
    """Raise ConcurrencyError unless ``expected`` is ANY or equals ``actual``.

    >>> check_expected_version("a", ANY, 3)
    >>> check_expected_version("a", 2, 3)
    Traceback (most recent call last):
    ...
    incident.errors.ConcurrencyError: Stream 'a' is at version 3, expected 2; nothing was written
    """
    check_version_argument(expected)
    if expected is not ANY and expected != actual:
        raise ConcurrencyError(aggregate_id, expected, actual)


def check_version_argument(expected: object) -> None:
    """InvalidArgument unless ``expected`` is ANY or an int >= 0 (a version)."""
    if expected is ANY:
        return
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidArgument(
            f"expected_version must be an int >= 0 or incident.ANY, got {expected!r}"
        )


def checked_events(aggregate_id: str, events: Iterable[Event]) -> list[Event]:
    """The events as a list, refusing an id no store can keep and anything that is not
    an Event, so a bad batch fails before anything is written."""
    storable.check_id(aggregate_id)
    checked = list(events)
    for event in checked:
        if not isinstance(event, Event):
            raise InvalidArgument(f"Cannot append {event!r} to {aggregate_id!r}: not an Event")
    return checked


def checked_request(request: AppendRequest) -> list[Event]:
    """The append's events as a list, once everything a store refuses of the request
    without reading the database is refused: the id, the events, the expected version's
    type, the aggregate name and the idempotency key (metadata and payloads are checked
    as they are encoded)."""
    events = checked_events(request.aggregate_id, request.events)
    check_version_argument(request.expected_version)
    check_aggregate_name(request.aggregate)
    storable.check_metadata(request.metadata)
    if request.idempotency_key is not None:
        check_key(request.idempotency_key)
    return events


def check_rejection(reason: object, detail: object) -> None:
    """Unstorable unless a remembered rejection's ``reason`` is a str and its ``detail``
    None or a str, each without a NUL or a lone surrogate (no store could give them
    back)."""
    for what, text in (("rejection reason", reason), ("rejection detail", detail)):
        if text is None and what == "rejection detail":
            continue
        if not isinstance(text, str):
            raise Unstorable(what, None, f"must be a str, got {storable.shown(text)}")
        if (problem := storable.problem_in(text)) is not None:
            raise Unstorable(what, None, problem[1])


def check_checkpoint(handler: object, **positions: object) -> None:
    """InvalidArgument unless ``handler`` is a str and each of ``positions`` (a
    checkpoint's position, or the one a save expects) a position every store keeps: an
    int from 0 to 2**63 - 1. A checkpoint store checks before it reads or writes."""
    if not isinstance(handler, str):
        raise InvalidArgument(f"a handler is named by a str, got {storable.shown(handler)}")
    for name, value in positions.items():
        if not _count(value, 0, storable.INT64_MAX):
            raise InvalidArgument(
                f"{name} must be a position (an int from 0 to 2**63 - 1), got "
                f"{storable.shown(value)}; nothing was written"
            )


INT32_MAX = 2**31 - 1  # Postgres keeps an owed row's attempts in an integer column


def check_owed(owed: object) -> None:
    """InvalidArgument unless every store keeps this owed work as given: an ``Owed``
    whose ``event_id`` is a UUID as incident spells one (``str(uuid.UUID(...))``:
    lower-case, with hyphens), ``position`` an int from 1 to 2**63 - 1 (or, inside an
    append, a position the database has not given yet), ``handler`` and ``event_type``
    non-empty strs without NUL or lone surrogates, ``aggregate_id`` an id every store
    keeps (:func:`incident.storable.keepable_id`), ``error`` None or such a str,
    ``attempts`` an int from 0 to 2**31 - 1 and ``owed_at`` an aware datetime."""
    if not isinstance(owed, Owed):
        raise InvalidArgument(f"owed work must be an incident.Owed, got {storable.shown(owed)}")
    problem = _record_problem(owed, owed.owed_at, "owed_at", dead_letter=False)
    if problem is not None:
        raise InvalidArgument(f"owed work {problem}; nothing was written")


def check_parked(parked: object) -> None:
    """InvalidArgument unless every store keeps this dead letter as given: a ``Parked``
    whose fields follow :func:`check_owed`'s rules, except that its ``event_id``,
    ``aggregate_id`` and ``event_type`` may be any str every store keeps, empty too (a
    damaged row's are not known), its ``error`` is a str (incident's are
    :func:`incident.storable.error_text`) and ``parked_at`` an aware datetime."""
    if not isinstance(parked, Parked):
        raise InvalidArgument(f"a dead letter must be a Parked, got {storable.shown(parked)}")
    problem = _record_problem(parked, parked.parked_at, "parked_at", dead_letter=True)
    if problem is not None:
        raise InvalidArgument(f"a dead letter {problem}; nothing was written")


def _record_problem(
    record: Owed | Parked, when: object, when_name: str, *, dead_letter: bool
) -> str | None:
    """What an owed-work or dead-letter record breaks of the rules above, or None."""
    shown = storable.shown
    event_id, position, attempts = record.event_id, record.position, record.attempts
    if dead_letter:
        for name in ("event_id", "aggregate_id", "event_type"):
            value = getattr(record, name)
            if not isinstance(value, str) or storable.problem_in(value) is not None:
                return f"needs an {name} that is a str every store keeps, got {shown(value)}"
    elif not isinstance(event_id, str) or not _canonical_uuid(event_id):
        return f"needs an event_id that is a UUID in lower case, got {shown(event_id)}"
    if not isinstance(position, Unnumbered) and not _count(position, 1, storable.INT64_MAX):
        return f"needs a position that is an int from 1 to 2**63 - 1, got {shown(position)}"
    for name in ("handler",) if dead_letter else ("handler", "event_type"):
        value = getattr(record, name)
        if not isinstance(value, str) or not value or storable.problem_in(value) is not None:
            return f"needs a {name} that is a non-empty str every store keeps, got {shown(value)}"
    aggregate_id = record.aggregate_id
    if not dead_letter and (
        not isinstance(aggregate_id, str) or not storable.keepable_id(aggregate_id)
    ):
        return f"needs an aggregate_id every store keeps, got {shown(aggregate_id)}"
    error = record.error
    if not (error is None and not dead_letter) and (
        not isinstance(error, str) or storable.problem_in(error) is not None
    ):
        none = "" if dead_letter else "None or "
        return f"needs an error that is {none}a str every store keeps, got {shown(error)}"
    if not _count(attempts, 0, INT32_MAX):
        return f"needs attempts that is an int from 0 to 2**31 - 1, got {shown(attempts)}"
    if not isinstance(when, dt.datetime) or when.utcoffset() is None:
        return f"needs a {when_name} that is an aware datetime, got {shown(when)}"
    return None


def _count(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _canonical_uuid(text: str) -> bool:
    if len(text) != 36:
        return False
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
