"""The registry that turns stored event type names back into Event classes: explicit
registration first (per store, shared by the command handlers on it, one class per
name), then, as a last resort for names nobody registered, the Event subclasses defined
in the process."""

import sys
from collections.abc import Callable, Iterable
from typing import Any, Union

import msgspec

from .errors import CorruptEvent, RegistrationError, UnknownEventType
from .messages import Event, event_classes_defined, event_type_name

__all__ = ["EventTypes", "Upcaster"]


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class EventTypes:
    """Resolves stored event type names to Event classes, with one reused decoder each.

    Resolution is explicit first: a name registered here (by every command handler on
    the store, from its aggregates, see :meth:`include`) always reads as its registered
    class, and one name belongs to one class: a second class under it is refused with a
    RegistrationError naming both, whoever registers it. Only a name nobody registered
    falls back, as a last resort, to the Event subclasses defined in the process (the
    latest definition still reachable from its module winning), so a notebook or the CLI
    can read a log without registering anything; the fallback never shadows a
    registered name.
    """

    def __init__(self, types: Iterable[type[Event]] = ()) -> None:
        self._types: dict[str, type[Event]] = {}
        self._owners: dict[str, str | None] = {}  # who registered each name, if said
        self._decoders: dict[type[Event], msgspec.json.Decoder[Any]] = {}
        self._upcasters: dict[tuple[str, int], tuple[Upcaster, str | None]] = {}
        self._batch: msgspec.json.Decoder[list[Any]] | None = None
        self.register(*types)

    def register(self, *types: type[Event], owner: str | None = None) -> None:
        """Register event classes under their stored names, all or none. A name belongs
        to one class: another class stored under it is refused (RegistrationError naming
        both, and both owners when given: the aggregates that apply them). The one
        exception is the same class defined again (same module and qualified name: a
        notebook cell run twice) registered again by the same owner, which takes over.

        >>> class Opened(Event):
        ...     number: str
        >>> types = EventTypes()
        >>> types.register(Opened, owner="account")
        >>> class Other(Event, tag="Opened"):
        ...     pass
        >>> types.register(Other, owner="ledger")
        Traceback (most recent call last):
        ...
        incident.errors.RegistrationError: account and ledger both store an event as 'Opened' ...
        """
        claimed: dict[str, type[Event]] = {}
        for event_type in types:
            name = event_type_name(event_type)
            first = claimed.setdefault(name, event_type)
            if first is not event_type:  # two classes in one registration never take over
                raise _clash(name, first, owner, event_type, owner)
            self._check(name, event_type, owner)
        for name, event_type in claimed.items():
            self._types[name] = event_type
            self._owners[name] = owner or self._owners.get(name)
        if claimed:
            self._batch = None

    def register_upcaster(
        self, name: str, from_version: int, upcaster: Upcaster, *, owner: str | None = None
    ) -> None:
        """Use ``upcaster`` on payloads of ``name`` stored at schema version
        ``from_version``. One step has one upcaster: another function for it is refused
        (RegistrationError), unless it is the same function defined again by the same
        owner, as for event classes."""
        self._check_upcaster(name, from_version, upcaster, owner)
        self._upcasters[(name, from_version)] = (upcaster, owner)

    def include(self, other: "EventTypes") -> None:
        """Register everything ``other`` registers, with its owners, all or none: how a
        command handler adds its aggregates' types to the registry of a store that other
        command handlers may share (a name one of them registered is never overwritten
        by another's class)."""
        for name, event_type in other._types.items():
            self._check(name, event_type, other._owners.get(name))
        for (name, version), (upcaster, owner) in other._upcasters.items():
            self._check_upcaster(name, version, upcaster, owner)
        for name, event_type in other._types.items():
            self.register(event_type, owner=other._owners.get(name))
        for (name, version), (upcaster, owner) in other._upcasters.items():
            self._upcasters[(name, version)] = (upcaster, owner)

    def _check(self, name: str, event_type: type[Event], owner: str | None) -> None:
        known = self._types.get(name)
        if known is None or known is event_type:
            return
        known_owner = self._owners.get(name)
        if _place(known) == _place(event_type) and (
            owner is None or known_owner is None or owner == known_owner
        ):
            return  # defined again (a notebook cell run twice): it takes over
        raise _clash(name, known, known_owner, event_type, owner)

    def _check_upcaster(
        self, name: str, version: int, upcaster: Upcaster, owner: str | None
    ) -> None:
        known = self._upcasters.get((name, version))
        if known is None or known[0] is upcaster:
            return
        known_owner = known[1]
        if _place(known[0]) == _place(upcaster) and (
            owner is None or known_owner is None or owner == known_owner
        ):
            return
        raise RegistrationError(
            f"{_place(known[0])} ({known_owner or 'registered first'}) and {_place(upcaster)} "
            f"({owner or 'registered now'}) both upcast {name!r} from schema version "
            f"{version}; one store reads each stored payload one way: keep one of them"
        )

    def decode_joined(self, joined: str, count: int) -> list[Event] | None:
        """Decode ``count`` stored payloads, joined by commas (a store joins them in SQL),
        in one call: one reused decoder of a JSON array of the registered types' tagged
        union (each payload carries its tag). None when they are not exactly ``count``
        events of the registered types (one unknown, or damaged): the caller then decodes
        row by row by type name, which resolves unregistered names and says where the
        damage is. It never upcasts, so it stands aside while any registered type is past
        its first schema version. The store checks that each payload's tag agrees with
        its row's type name before handing them over.

        >>> class Opened(Event):
        ...     number: str
        >>> EventTypes([Opened]).decode_joined('{"type":"Opened","number":"A1"}', 1)
        [Opened(number='A1')]
        """
        decoder = self._batch
        if decoder is None:
            if not self._types or any(t.schema_version != 1 for t in self._types.values()):
                return None  # nothing to decode to, or payloads that may need upcasting
            union = Union[tuple(self._types.values())]  # type: ignore[valid-type]  # noqa: UP007
            try:
                decoder = msgspec.json.Decoder(list[union])  # type: ignore[valid-type]
            except TypeError:  # types that cannot share one union (different tag fields)
                return None
            self._batch = decoder
        try:
            events: list[Event] = decoder.decode(f"[{joined}]")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        # a damaged payload could merge with or split its neighbours: the count must hold
        return events if len(events) == count else None

    def resolve(self, name: str) -> type[Event] | None:
        """The class for a stored name: the registered one; for a name nobody registered,
        the latest defined (the fallback); else None."""
        found = self._types.get(name)
        if found is None:
            found = _defined_event_type(name)
        return found

    def registered(self) -> dict[str, type[Event]]:
        """Stored name -> the class registered under it (a copy; no fallback names)."""
        return dict(self._types)

    def names(self) -> set[str]:
        """Every stored name this registry can resolve: the registered ones, and those the
        fallback to the classes defined in the process finds."""
        return set(self._types) | set(_candidates())

    def decoder(
        self, name: str, *, position: int | None = None, aggregate_id: str = ""
    ) -> msgspec.json.Decoder[Any]:
        """A reusable JSON decoder for a stored name; UnknownEventType if nothing resolves it."""
        event_type = self._types.get(name)
        if event_type is None:
            # not registered: resolve again every time, so a redefinition is picked up
            event_type = _defined_event_type(name)
            if event_type is None:
                raise UnknownEventType(name, self.names(), position, aggregate_id)
        decoder = self._decoders.get(event_type)
        if decoder is None:
            decoder = self._decoders[event_type] = msgspec.json.Decoder(event_type)
        return decoder

    def decode(
        self,
        name: str,
        data: bytes | str,
        *,
        position: int | None = None,
        aggregate_id: str = "",
        schema_version: int | None = None,
    ) -> Event:
        """Decode one stored payload, upcasting it first when it was stored at an older
        schema version; a bad payload raises CorruptEvent naming where it is."""
        decoder = self.decoder(name, position=position, aggregate_id=aggregate_id)
        try:
            if schema_version is not None:
                current = self._types.get(name) or self.resolve(name)
                if current is not None and schema_version != current.schema_version:
                    return self._upcast(name, data, schema_version, current, position, aggregate_id)
            event: Event = decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise CorruptEvent(position, aggregate_id, str(error), event_type=name) from error
        return event

    def _upcast(
        self,
        name: str,
        data: bytes | str,
        stored: int,
        event_type: type[Event],
        position: int | None,
        aggregate_id: str,
    ) -> Event:
        target = event_type.schema_version
        if stored > target:
            raise CorruptEvent(
                position,
                aggregate_id,
                f"{name} was stored at schema version {stored}, newer than this code's {target}",
            )
        payload = msgspec.json.decode(data)
        for version in range(stored, target):
            found = self._upcasters.get((name, version))
            if found is None:
                raise CorruptEvent(
                    position,
                    aggregate_id,
                    f"{name} is stored at schema version {version} and no upcaster brings it "
                    f"to {version + 1}; register one with @aggregate.upcast({name!r}, {version})",
                )
            upcaster = found[0]
            try:
                payload = upcaster(payload)
            except Exception as error:  # the stored payload is not what the upcaster expects
                raise CorruptEvent(
                    position,
                    aggregate_id,
                    f"{getattr(upcaster, '__qualname__', upcaster)} could not bring {name} from "
                    f"schema version {version} to {version + 1}: {error!r}",
                ) from error
        event: Event = msgspec.convert(payload, event_type)
        return event


def _place(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _clash(
    name: str,
    known: type[Event],
    known_owner: str | None,
    event_type: type[Event],
    owner: str | None,
) -> RegistrationError:
    """The error for two classes under one stored name, naming both (and their owners)."""
    if known_owner is not None and owner is not None:
        suggested = f"{owner.title().replace('_', '')}{event_type.__name__}"
        return RegistrationError(
            f"{known_owner} and {owner} both store an event as {name!r} ({_place(known)} and "
            f"{_place(event_type)}); a store could not tell them apart: give one a name of "
            f'its own, e.g. class {event_type.__name__}(incident.Event, tag="{suggested}")'
        )
    return RegistrationError(
        f"{_place(event_type)} and {_place(known)} would both be stored as {name!r}, and one "
        f"store cannot tell them apart; give one a name of its own: "
        f"class {event_type.__name__}(incident.Event, tag=...)"
    )


def _subclasses(cls: type[Event]) -> Iterable[type[Event]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_defined: tuple[int, dict[str, list[type[Event]]]] = (-1, {})


def _reachable(cls: type[Event]) -> bool:
    """Whether the class is still what its module exports under its name: false for a
    class a notebook cell has since redefined, or whose module has gone away."""
    module = sys.modules.get(cls.__module__)
    if module is None:
        return False
    if "<locals>" in cls.__qualname__:
        return True  # defined in a function: nothing to compare it with
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def _candidates() -> dict[str, list[type[Event]]]:
    """Stored name -> every Event subclass defined under it, oldest first (recomputed only
    after a new Event subclass has been defined)."""
    global _defined
    generation = event_classes_defined()
    if _defined[0] != generation:
        found: dict[str, list[type[Event]]] = {}
        for sub in _subclasses(Event):
            tag = sub.__struct_config__.tag
            if isinstance(tag, str):
                found.setdefault(tag, []).append(sub)
        _defined = (generation, found)
    return _defined[1]


def _defined_event_type(name: str) -> type[Event] | None:
    """The class to read a stored name as: the latest defined among those still reachable
    from their module, else the latest defined, else None."""
    candidates = _candidates().get(name)
    if not candidates:
        return None
    return next((c for c in reversed(candidates) if _reachable(c)), candidates[-1])
