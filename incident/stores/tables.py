"""How a Projection type becomes a table, decided once for every backend.

A read model is stored in a table of its own: named ``table_name`` when the class
declares ``table_name: ClassVar[str]``, else the snake_case of the class name
(``BankAccount`` -> ``bank_account``). It has one column per struct field (named like the
field's encoded name), is keyed by the ``aggregate_id`` column, and when the type has an
integer ``version`` field an upsert never replaces a row of a higher version.

This module says *what* the table is: its name, its columns (a :class:`Kind` each, whether
it accepts None, which one is the key, which one guards the version) and which names the
stores keep for themselves. Each backend maps the kinds to its own SQL types. It also
keeps the rule that one table has one class (:class:`TableOwners`). No driver is
imported here: the memory store applies the same spec and the same refusals.
"""

from __future__ import annotations

import enum
import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from ..errors import IncidentError, InvalidArgument
from ..messages import Projection
from ..storable import shown

__all__ = [
    "RESERVED_NAMES",
    "Column",
    "Kind",
    "TableOwners",
    "TableSpec",
    "check_projection_type",
    "check_table_name",
    "legacy_name",
    "qualified",
    "snake_case",
    "table_spec",
]

# Every name incident gives a table, index or function of its own, on any backend
# (tables and indexes share one namespace in both SQLite and Postgres).
RESERVED_NAMES = frozenset(
    {
        # SQLite
        "events",
        "incident_schema",
        "incident_idempotency",
        "incident_owed",
        "incident_checkpoints",
        "incident_parked",
        "incident_events_v3",
        # Postgres
        "incident_migrations",
        "idempotency_keys",
        "begin_append",
        "events_pkey",
        "events_event_id",
        "events_stream_version",
        "idempotency_keys_pkey",
    }
)
# the database engines' own names, and room for incident's future tables
SYSTEM_PREFIXES = ("sqlite_", "pg_")
INCIDENT_PREFIX = "incident_"
MAX_NAME = 63  # Postgres cuts longer identifiers short, so two long names could meet
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


class Kind(enum.Enum):
    """What a column holds, as finely as any backend's SQL types tell values apart."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STR = "str"
    BYTES = "bytes"
    DATETIME = "datetime"  # aware, or awareness not required
    NAIVE_DATETIME = "naive datetime"  # declared tz=False
    DATE = "date"
    TIME = "time"
    TIMEDELTA = "timedelta"
    UUID = "uuid"
    DECIMAL = "decimal"
    STR_LITERAL = "str literal"
    STR_ENUM = "str enum"
    INT_CHOICE = "int literal or enum"
    JSON = "json"  # lists, dicts, nested structs, mixed unions, Any


@dataclass(frozen=True)
class Column:
    name: str  # the field's encoded name
    attribute: str  # the field's Python name
    kind: Kind
    nullable: bool  # whether the field accepts None
    key: bool = False
    version: bool = False  # guards the upsert: a lower version never replaces a higher


@dataclass(frozen=True)
class TableSpec:
    type: type[Projection]
    name: str
    columns: tuple[Column, ...]  # in field order
    explicit: bool  # named by the class's table_name

    @property
    def key(self) -> str:
        return next(column.name for column in self.columns if column.key)

    @property
    def version(self) -> str | None:
        return next((column.name for column in self.columns if column.version), None)

    @property
    def owner(self) -> str:
        return qualified(self.type)

    @functools.cached_property
    def checked_columns(self) -> tuple[Column, ...]:
        """The columns whose values are held to more than JSON: integers (64 bits) and
        datetimes (aware or naive, as declared)."""
        kinds = (Kind.INT, Kind.DATETIME, Kind.NAIVE_DATETIME)
        return tuple(column for column in self.columns if column.kind in kinds)

    @functools.cached_property
    def decoder(self) -> msgspec.json.Decoder[Any]:
        """Reads a row's JSON as the type: what it refuses, no store keeps."""
        return msgspec.json.Decoder(self.type)

    @functools.cached_property
    def instant_columns(self) -> tuple[str, ...]:
        """The attributes of aware datetime columns: stored and read back in UTC."""
        return tuple(c.attribute for c in self.columns if c.kind is Kind.DATETIME)


def qualified(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def snake_case(name: str) -> str:
    """
    >>> snake_case("BankAccount"), snake_case("HTTPStatusView")
    ('bank_account', 'http_status_view')
    """
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def legacy_name(spec: TableSpec) -> str | None:
    """The snake_case of the class name, where Postgres stores of earlier releases kept a
    type that declares a table_name: None when that is its table anyway."""
    old = snake_case(spec.type.__name__)
    return old if spec.explicit and old != spec.name else None


def check_table_name(name: str, *, owner: str, explicit: bool) -> None:
    """Refuse a name no projection may take.

    A declared table_name must be a plain lower-case SQL identifier of at most 63
    characters, not reserved and not starting with ``incident_``. A name derived from
    the class is held to the reserved names, the engines' prefixes and the length (a
    class such as ``IncidentReport`` keeps its table ``incident_report``).

    >>> check_table_name("bank_accounts", owner="m.BankAccount", explicit=True)
    >>> try:
    ...     check_table_name("events", owner="m.Events", explicit=False)
    ... except IncidentError as error:
    ...     print(str(error).split(";")[0])
    m.Events would be stored in table 'events', which incident keeps for itself
    """
    if explicit and not _IDENTIFIER.fullmatch(name):
        raise IncidentError(
            f"{owner}.table_name {name!r} is not a plain SQL identifier: use lower-case "
            "letters, digits and underscores, starting with a letter or underscore"
        )
    if len(name) > MAX_NAME:
        raise IncidentError(
            f"{owner} would be stored in table {name!r}, longer than {MAX_NAME} characters; "
            "declare a shorter table_name: ClassVar[str]"
        )
    if (
        name in RESERVED_NAMES
        or name.startswith(SYSTEM_PREFIXES)
        or (explicit and name.startswith(INCIDENT_PREFIX))
    ):
        raise IncidentError(
            f"{owner} would be stored in table {name!r}, which incident keeps for itself; "
            "rename the class or declare another table_name: ClassVar[str]"
        )


def table_spec(projection_type: type[Projection]) -> TableSpec:
    """The table of a Projection type, checked: refuses (InvalidArgument) a type that is
    not a Projection, before anything is claimed for it, then a name it may not take and
    a type without an ``aggregate_id: str`` field."""
    check_projection_type(projection_type)
    owner = qualified(projection_type)
    declared = getattr(projection_type, "table_name", None)
    if declared is not None and not isinstance(declared, str):
        raise IncidentError(f"{owner}.table_name must be a str, got {declared!r}")
    explicit = bool(declared)
    name = declared if declared else snake_case(projection_type.__name__)
    check_table_name(name, owner=owner, explicit=explicit)
    info = mi.type_info(projection_type)
    assert isinstance(info, mi.StructType)  # a Projection is a Struct
    columns = []
    for field in info.fields:
        kind = column_kind(field.type)
        is_key = field.name == "aggregate_id"
        if is_key and kind not in (Kind.STR, Kind.STR_LITERAL):
            raise IncidentError(f"{owner} needs an aggregate_id: str field to be stored")
        columns.append(
            Column(
                name=field.encode_name,
                attribute=field.name,
                kind=kind,
                nullable=accepts_none(field.type),
                key=is_key,
                version=field.name == "version" and kind is Kind.INT,
            )
        )
    if not any(column.key for column in columns):
        raise IncidentError(f"{owner} needs an aggregate_id: str field to be stored")
    check_column_names(owner, columns)
    return TableSpec(projection_type, name, tuple(columns), explicit)


def check_projection_type(projection_type: object) -> None:
    """InvalidArgument unless ``projection_type`` is an incident.Projection subclass: a
    struct with a read model's fields is not one, so no store makes a table for it.

    >>> try:
    ...     check_projection_type(dict)
    ... except InvalidArgument as error:
    ...     print(str(error).split(",")[0])
    builtins.dict is not a msgspec Struct
    """
    if isinstance(projection_type, type) and issubclass(projection_type, Projection):
        return
    if not isinstance(projection_type, type):
        raise InvalidArgument(
            f"{shown(projection_type)} is not a type: a read model is an incident.Projection"
        )
    owner = qualified(projection_type)
    if not issubclass(projection_type, msgspec.Struct):
        raise InvalidArgument(
            f"{owner} is not a msgspec Struct, so it cannot be stored"
            " (a read model is an incident.Projection)"
        )
    raise InvalidArgument(
        f"{owner} is not an incident.Projection, so no store keeps it as a read model"
    )


#: columns Postgres gives every table: a field of one of these names cannot be a column
SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid", "oid"})


def check_column_names(owner: str, columns: Sequence[Column]) -> None:
    """Refuse fields that could not each be a column of their own on every store: an
    empty or NUL-holding name, one past 63 bytes (Postgres would cut two such names to
    one), one holding a ``%`` (the Postgres driver takes it for a parameter's
    placeholder), two names apart only by case (SQLite ignores case in names) and the
    names of Postgres's system columns."""
    seen: dict[str, Column] = {}
    for column in columns:
        name, field = column.name, column.attribute
        if not name or "\x00" in name:
            why = "is empty" if not name else "holds a NUL character"
            raise IncidentError(f"{owner}.{field}: its column name {name!r} {why}")
        if "%" in name:
            raise IncidentError(
                f"{owner}.{field}: its column name {name!r} holds a %, which the Postgres"
                " driver takes for a parameter's placeholder; give it another encoded name"
                " (msgspec.field(name=...))"
            )
        if len(name.encode()) > MAX_NAME:
            raise IncidentError(
                f"{owner}.{field}: its column name is longer than {MAX_NAME} bytes; "
                "shorten it, or give it a shorter encoded name (msgspec.field(name=...))"
            )
        if name.lower() in SYSTEM_COLUMNS:
            raise IncidentError(
                f"{owner}.{field}: Postgres keeps a column {name.lower()!r} in every "
                "table; rename the field or give it another encoded name"
            )
        other = seen.setdefault(name.lower(), column)
        if other is not column:
            raise IncidentError(
                f"{owner}.{other.attribute} and {owner}.{field}: their column names differ "
                "only by case, and SQLite ignores case in names; rename one of them"
            )


_SCALARS: tuple[tuple[type[mi.Type], Kind], ...] = (
    (mi.BoolType, Kind.BOOL),
    (mi.IntType, Kind.INT),
    (mi.FloatType, Kind.FLOAT),
    (mi.StrType, Kind.STR),
    (mi.BytesType, Kind.BYTES),
    (mi.ByteArrayType, Kind.BYTES),
    (mi.DateType, Kind.DATE),
    (mi.TimeType, Kind.TIME),
    (mi.TimeDeltaType, Kind.TIMEDELTA),
    (mi.UUIDType, Kind.UUID),
    (mi.DecimalType, Kind.DECIMAL),
)


def column_kind(field_type: mi.Type) -> Kind:
    """The kind of a field's column: ``X | None`` is the kind of ``X``.

    >>> from typing import Literal, Optional
    >>> column_kind(mi.type_info(Optional[int])), column_kind(mi.type_info(list[str]))
    (<Kind.INT: 'int'>, <Kind.JSON: 'json'>)
    >>> column_kind(mi.type_info(Literal["a", "b"]))
    <Kind.STR_LITERAL: 'str literal'>
    """
    if isinstance(field_type, mi.Metadata):
        return column_kind(field_type.type)
    if isinstance(field_type, mi.UnionType):
        present = [t for t in field_type.types if not isinstance(t, mi.NoneType)]
        return column_kind(present[0]) if len(present) == 1 else Kind.JSON
    if isinstance(field_type, mi.DateTimeType):
        return Kind.NAIVE_DATETIME if field_type.tz is False else Kind.DATETIME
    for inspected, kind in _SCALARS:
        if isinstance(field_type, inspected):
            return kind
    values: Sequence[Any] = ()
    if isinstance(field_type, mi.LiteralType):
        values = field_type.values
    elif isinstance(field_type, mi.EnumType):
        values = [member.value for member in field_type.cls]
    if values and all(isinstance(v, str) for v in values):
        return Kind.STR_LITERAL if isinstance(field_type, mi.LiteralType) else Kind.STR_ENUM
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return Kind.INT_CHOICE
    return Kind.JSON


def accepts_none(field_type: mi.Type) -> bool:
    if isinstance(field_type, mi.Metadata):
        return accepts_none(field_type.type)
    if isinstance(field_type, mi.UnionType):
        return any(accepts_none(t) for t in field_type.types)
    return isinstance(field_type, mi.NoneType | mi.AnyType)


class TableOwners:
    """Which class owns each table of one store (or one database's stores).

    The first class used with a table owns it. Another class with the same module and
    qualified name (a notebook cell run again) takes it over; any other class is
    refused at once, naming both, so two read models never share rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[type[Projection], TableSpec] = {}
        self._owners: dict[str, type[Projection]] = {}

    def claim(self, projection_type: type[Projection]) -> tuple[TableSpec, bool]:
        """The type's spec, and whether it just took its table over from a class of the
        same name (whose fields may differ, so the table is checked again)."""
        spec = self._specs.get(projection_type)
        if spec is not None:
            return spec, False
        spec = table_spec(projection_type)
        with self._lock:
            owner = self._owners.get(spec.name)
            if owner is not None and qualified(owner) != spec.owner:
                raise IncidentError(
                    f"{spec.owner} and {qualified(owner)} would both be stored in table "
                    f"{spec.name!r}; give one a table_name: ClassVar[str]"
                )
            self._owners[spec.name] = projection_type
            self._specs[projection_type] = spec
        return spec, owner is not None and owner is not projection_type

    def owner_of(self, name: str) -> type[Projection] | None:
        with self._lock:
            return self._owners.get(name)
