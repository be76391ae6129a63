"""Messages: commands, events, projections and the stored envelope. Pure data, no I/O."""

import datetime as dt
import functools
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar, dataclass_transform

import msgspec

from .errors import RegistrationError
from .storable import problem_in

__all__ = [
    "ANY",
    "Command",
    "Event",
    "Projection",
    "Recorded",
    "event_classes_defined",
    "event_type_name",
]


# How many Event subclasses have been defined in this process (see Event.__init_subclass__).
_event_classes_defined = 0


class _KeywordOnly(msgspec.StructMeta):
    """Makes every subclass keyword-only too: msgspec's ``kw_only`` covers only the fields
    of the class that says it (``frozen`` is inherited on its own)."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **options: Any
    ) -> "_KeywordOnly":
        options.setdefault("kw_only", True)
        # msgspec.defstruct hands a custom metaclass its field names as __slots__, which
        # StructMeta itself then refuses; the fields are in __annotations__ all the same
        namespace = {key: value for key, value in namespace.items() if key != "__slots__"}
        cls = super().__new__(mcls, name, bases, namespace, **options)
        tag = cls.__struct_config__.tag
        if isinstance(tag, str) and (problem := problem_in(tag)) is not None:
            # the stored type name of every event of the class: refused where it is declared
            raise RegistrationError(f"{name}'s stored event type name {problem[1]}")
        return cls


# Subclasses are frozen and keyword-only at runtime; dataclass_transform tells type checkers.
@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(msgspec.field,))
class Command(msgspec.Struct, frozen=True, metaclass=_KeywordOnly):
    """Base of commands: an imperative request aimed at one aggregate by ``aggregate_id``.

    Subclasses declare ``aggregate_id: str`` plus their own fields; ``msgspec.Meta``
    constraints on the fields are enforced when the command is dispatched.
    """

    if TYPE_CHECKING:
        # Declared for type checkers only, so ``command.aggregate_id`` is a str on any
        # Command. A runtime field here would come first in every subclass: a command
        # declaring it after other fields would change its field order, hence its JSON
        # and the idempotency keys of its follow-ups (command_key), and, under
        # ``kw_only=False``, what its positional arguments mean. Registering an execute
        # function checks the subclass declares it (Aggregate.execute).
        aggregate_id: str


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(msgspec.field,))
class Event(msgspec.Struct, frozen=True, tag=True, metaclass=_KeywordOnly):
    """Base of events: a fact in the past tense.

    The stored type name is the class name, or the explicit ``tag`` given at class
    definition (``class Deposited(Event, tag="MoneyDeposited")``), which lets a
    class be renamed without touching stored data. ``schema_version`` is bumped when
    the payload's shape changes; upcasters bring older payloads up to it.
    """

    schema_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        global _event_classes_defined
        _event_classes_defined += (
            1  # lets the registry cache its name -> class map until this moves
        )


@dataclass_transform(kw_only_default=True, field_specifiers=(msgspec.field,))
class Projection(msgspec.Struct, metaclass=_KeywordOnly):
    """Base of read models, keyed by their ``aggregate_id`` field.

    A projection with an integer ``version`` field is never replaced by one with a
    lower version, so racing writers cannot move a read model backwards.
    """


E = TypeVar("E", bound=Event, covariant=True)


class Recorded(msgspec.Struct, Generic[E], frozen=True, kw_only=True):
    """The stored envelope of one event, stamped by the store.

    ``position`` is global, gapless and in commit order (from 1); ``version`` counts
    the events of one aggregate (from 1); ``event_date`` is UTC.
    """

    position: int
    event_id: str
    aggregate_id: str
    aggregate: str
    version: int
    event_type: str
    event_date: dt.datetime
    data: E
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class _Any:
    """Sentinel for ``expected_version``: append whatever the stream's version is."""

    _instance: ClassVar["_Any | None"] = None

    def __new__(cls) -> "_Any":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"

    def __reduce__(self) -> str:
        return "ANY"


ANY: Final = _Any()


@functools.lru_cache(maxsize=4096)  # every append names its events; a class's name never changes
def event_type_name(event_type: type[Event]) -> str:
    """The stable name under which events of this class are stored.

    >>> class Opened(Event):
    ...     number: str
    >>> class Renamed(Event, tag="AccountClosed"):
    ...     pass
    >>> event_type_name(Opened), event_type_name(Renamed)
    ('Opened', 'AccountClosed')
    """
    tag = event_type.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{event_type.__qualname__} is not an incident.Event subclass")
    # msgspec hands an explicit tag down to subclasses: two classes of one lineage stored
    # under one name would read back as whichever of them was registered last.
    for base in event_type.__mro__[1:]:
        if base is not Event and issubclass(base, Event) and base.__struct_config__.tag == tag:
            raise RegistrationError(
                f"{event_type.__qualname__} would be stored as {tag!r}, like its base "
                f"{base.__qualname__}; give it its own name: "
                f"class {event_type.__name__}({base.__name__}, tag=...)"
            )
    return tag


def event_classes_defined() -> int:
    """How many Event subclasses have been defined in this process so far: a registry
    that maps names to the defined classes keeps its map until this number moves."""
    return _event_classes_defined
