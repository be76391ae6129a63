"""Snapshots: an aggregate's state every N events, so a cold start reads the latest
snapshot and only the events after it.

A snapshot is a Projection row (key ``"<aggregate>/<id>"``), so every projection store
keeps them, version-guarded, and on the event store's own database it commits in the
same transaction as the event that triggered it.

A snapshot is only trusted when its ``code`` equals :func:`code_key` of the running
code: a hash of everything that decides what the state is (the aggregate's
``snapshot_version``, its state type, apply functions, upcasters and event types, and
the functions, classes and constants of the user's own modules that they reach). The
hash is made of code and data, never of addresses or ids, so an unchanged program gets
the same key in every process, and a changed one gets another, whose old snapshots are
then ignored.

The state is encoded as JSON and decoded as the aggregate's ``state_type``, so it comes
back with its own types (int keys, ``Decimal``, tuples, sets, nested Structs, dates).
:func:`check_snapshottable` refuses, when the command handler is built, a state type
that would not come back as it went in.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import dis
import enum
import functools
import hashlib
import itertools
import logging
import site
import sys
import sysconfig
import types
import typing
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect

from .aggregate import Aggregate
from .errors import RegistrationError, SnapshotMismatch
from .messages import Projection, event_type_name

__all__ = [
    "Snapshot",
    "check_snapshottable",
    "code_key",
    "first_difference",
    "load_snapshot",
    "snapshot_key",
    "take_snapshot",
    "verify_snapshot",
]

log = logging.getLogger("incident")

# Bumped when the way the key is computed changes, so keys of the old way never match.
_KEY_FORMAT = "incident-snapshot-key/2"


class Snapshot(Projection):
    aggregate_id: str  # "<aggregate name>/<aggregate id>"
    aggregate: str
    version: int
    code: str
    state: str  # the state as JSON


# -- the key ------------------------------------------------------------------


def code_key(aggregate: Aggregate[Any]) -> str:
    """A hash of what decides the aggregate's state, the same in every process that runs
    the same code: its name and ``snapshot_version``, its state type, each apply function
    and upcaster, each event type (stored name, schema version, fields), and, followed
    through globals, closures and nested code, the functions, classes and constants of
    the user's modules they use (not incident's, the standard library's or those
    installed in site-packages, except the aggregate's own package)."""
    hasher = _CodeHasher(_own_packages(aggregate))
    hasher.put(_KEY_FORMAT, aggregate.name, str(aggregate.snapshot_version))
    hasher.put("state")
    hasher.hint(aggregate.state_type, force=True)
    for event_type, applier in sorted(
        aggregate.appliers.items(), key=lambda pair: event_type_name(pair[0])
    ):
        hasher.put("apply", event_type_name(event_type), str(event_type.schema_version))
        hasher.klass(event_type)
        hasher.reference(applier, force=True)
    for (name, version), upcaster in sorted(aggregate.upcasters.items()):
        hasher.put("upcast", name, str(version))
        hasher.reference(upcaster, force=True)
    return hasher.hexdigest()[:16]


def _own_packages(aggregate: Aggregate[Any]) -> frozenset[str]:
    """The top-level packages the aggregate's functions live in: followed even when
    installed into site-packages, as a deployed application often is."""
    functions: list[Any] = [*aggregate.appliers.values(), *aggregate.upcasters.values()]
    modules = {getattr(function, "__module__", None) or "" for function in functions}
    return frozenset(
        top for top in (name.partition(".")[0] for name in modules) if top and top != "incident"
    )


@functools.cache
def _installed_paths() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages())
    paths.add(site.getusersitepackages())
    return tuple(str(Path(path).resolve()) for path in paths if path)


def _is_library(module_name: str, own: frozenset[str]) -> bool:
    """Whether a module is someone else's code: incident itself (not its examples), the
    standard library, or anything installed; its functions count by name only."""
    if module_name == "incident" or (
        module_name.startswith("incident.") and not module_name.startswith("incident.examples")
    ):
        return True
    top = module_name.partition(".")[0]
    if top in own:
        return False
    if top in sys.stdlib_module_names or top == "builtins":
        return True
    module = sys.modules.get(module_name)
    filename = getattr(module, "__file__", None)
    if filename is None:  # __main__ of a notebook or a REPL, exec'd code: the user's
        return False
    path = Path(filename).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts):
        return True
    return any(path.is_relative_to(prefix) for prefix in _installed_paths())


_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


@functools.lru_cache(maxsize=4096)
def _names_used(code: types.CodeType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The global names a code object reads and the attribute names it reads, in order
    of first use: co_names mixes them, and an attribute (``event.line``) must not be
    looked up as a global that happens to share its name."""
    globals_used: dict[str, None] = {}
    attributes: dict[str, None] = {}
    for instruction in dis.get_instructions(code):
        if instruction.opname in _GLOBAL_LOADS:
            globals_used[instruction.argval] = None
        elif instruction.opname in _ATTRIBUTE_LOADS:
            attributes[instruction.argval] = None
    return tuple(globals_used), tuple(attributes)


def _name(value: Any) -> str:
    module = getattr(value, "__module__", None) or "?"
    return f"{module}:{getattr(value, '__qualname__', type(value).__qualname__)}"


def _plain_text(value: Any) -> str | None:
    """A stable text for plain data (scalars, dates, decimals, enum members, and
    containers of them, sets and dicts sorted), or None for anything else."""
    if value is None or isinstance(
        value, bool | int | float | complex | str | bytes | decimal.Decimal | uuid.UUID
    ):
        return f"{type(value).__name__}:{value!r}"
    if value is Ellipsis:
        return "..."
    if isinstance(value, enum.Enum):
        return f"enum:{_name(type(value))}.{value.name}={_plain_text(value.value)}"
    if isinstance(value, dt.date | dt.time | dt.timedelta):  # datetime is a date
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, tuple | list):
        items = [_plain_text(item) for item in value]
        return None if None in items else f"{type(value).__name__}[{','.join(items)}]"  # type: ignore[arg-type]
    if isinstance(value, set | frozenset):
        items = [_plain_text(item) for item in value]
        if None in items:
            return None
        return f"{type(value).__name__}{{{','.join(sorted(items))}}}"  # type: ignore[arg-type]
    if isinstance(value, dict):
        pairs = [(_plain_text(key), _plain_text(item)) for key, item in value.items()]
        if any(key is None or item is None for key, item in pairs):
            return None
        return f"dict{{{','.join(sorted(f'{key}:{item}' for key, item in pairs))}}}"
    return None


class _CodeHasher:
    """Walks code and data into a sha256 made of content only: bytecode, names,
    constants, field layouts. Each function and class is entered once; a second
    reference (a recursive helper, a cycle) is hashed by its name."""

    def __init__(self, own: frozenset[str]) -> None:
        self._digest = hashlib.sha256()
        self._own = own
        self._entered: dict[int, Any] = {}  # id -> object, kept alive so ids stay unique
        self._library: dict[str, bool] = {}

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def put(self, *parts: str) -> None:
        for part in parts:
            encoded = part.encode()
            self._digest.update(len(encoded).to_bytes(8, "big"))  # no two splits alike
            self._digest.update(encoded)

    def _enter(self, value: Any) -> bool:
        if id(value) in self._entered:
            self.put("again", _name(value))
            return False
        self._entered[id(value)] = value
        return True

    def _followed(self, value: Any) -> bool:
        if isinstance(value, types.ModuleType):
            module: Any = value.__name__
        else:
            module = getattr(value, "__module__", None)
        if not isinstance(module, str):  # code exec'd without a __name__: the user's
            return True
        if module not in self._library:
            self._library[module] = _is_library(module, self._own)
        return not self._library[module]

    # -- values ---------------------------------------------------------------

    def reference(self, value: Any, *, force: bool = False) -> None:
        """Whatever a name in user code resolves to."""
        if isinstance(value, staticmethod | classmethod | types.MethodType):
            value = value.__func__
        if isinstance(value, functools.partial):
            self.put("partial")
            self.reference(value.func)
            self.value(value.args)
            self.value(value.keywords)
        elif isinstance(value, property):
            self.put("property")
            for accessor in (value.fget, value.fset, value.fdel):
                self.reference(accessor)
        elif isinstance(value, types.FunctionType):
            if force or self._followed(value):
                self.function(value)
            else:
                self.put("function", _name(value))
        elif isinstance(value, type):
            if force or self._followed(value):
                self.klass(value)
            else:
                self.put("class", _name(value))
        else:
            self.value(value)

    def value(self, value: Any, namespace: dict[str, Any] | None = None) -> None:
        text = _plain_text(value)
        if text is not None:
            self.put(text)
        elif isinstance(value, types.CodeType):
            self.code(value, namespace or {})
        elif isinstance(value, tuple | list | set | frozenset | dict):
            self.put(type(value).__name__)  # holding something not plain: each in turn
            for item in value.items() if isinstance(value, dict) else value:
                self.reference(item)
        elif isinstance(value, types.ModuleType):
            self.put("module", value.__name__)
        elif isinstance(
            value, types.FunctionType | type | functools.partial | property | types.MethodType
        ):
            self.reference(value)
        elif callable(value) and hasattr(value, "__qualname__"):  # a builtin function
            self.put("callable", _name(value))
        else:  # an object: its type, not its contents (it may be a connection, a cache)
            self.put("object", _name(type(value)))

    # -- code -----------------------------------------------------------------

    def function(self, function: types.FunctionType) -> None:
        if not self._enter(function):
            return
        self.put("def", function.__qualname__)
        self.code(function.__code__, function.__globals__)
        self.value(function.__defaults__)
        self.value(function.__kwdefaults__)
        for cell in function.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not assigned yet
                self.put("empty cell")
                continue
            self.reference(contents)

    def code(self, code: types.CodeType, namespace: dict[str, Any]) -> None:
        """Bytecode, names and constants; nested code objects (lambdas, generator
        expressions, comprehensions) by their own content, never their repr, which holds
        an address."""
        self.put(
            "code",
            code.co_name,
            f"{code.co_argcount}/{code.co_posonlyargcount}/{code.co_kwonlyargcount}",
            str(code.co_flags),
            code.co_code.hex(),
            *code.co_names,
            "|",
            *code.co_varnames,
            "|",
            *code.co_freevars,
            "|",
            *code.co_cellvars,
        )
        for constant in code.co_consts:
            self.value(constant, namespace)
        globals_used, attributes = _names_used(code)
        for name in globals_used:
            if name in namespace:  # else a builtin
                self.put("global", name)
                found = namespace[name]
                if isinstance(found, types.ModuleType):
                    self._module(found, attributes)
                else:
                    self.reference(found)

    def _module(self, module: types.ModuleType, names: tuple[str, ...]) -> None:
        """A module used by user code: what the code may take from it, ``module.helper``
        (any attribute the code reads that the module has)."""
        self.put("module", module.__name__)
        if not self._followed(module):
            return
        for name in names:
            found = getattr(module, name, None)
            if found is not None and not isinstance(found, types.ModuleType):
                self.put("attribute", name)
                self.reference(found)

    # -- types ----------------------------------------------------------------

    def klass(self, cls: type) -> None:
        """A class: its bases, field layout and annotations, and what its body defines
        (methods, constants, enum members)."""
        if not self._enter(cls):
            return
        self.put("class", _name(cls), *(_name(base) for base in cls.__bases__))
        for base in cls.__bases__:
            if base is not object and self._followed(base):
                self.klass(base)
        if hasattr(cls, "__struct_fields__"):
            config = cls.__struct_config__  # type: ignore[attr-defined]
            self.put(
                "struct",
                *cls.__struct_fields__,
                "|",
                *cls.__struct_encode_fields__,  # type: ignore[attr-defined]
                f"tag={config.tag!r}/{config.tag_field!r}/array_like={config.array_like}",
            )
            for default in cls.__struct_defaults__:  # type: ignore[attr-defined]
                self.reference(getattr(default, "factory", default))
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception:  # an annotation that does not resolve: its text
            hints = dict(getattr(cls, "__annotations__", {}))
        for field, hint in hints.items():
            self.put("field", field)
            self.hint(hint)
        for name, member in sorted(vars(cls).items()):
            if name.startswith("__") and name != "__post_init__":
                continue
            if isinstance(
                member,
                types.FunctionType | staticmethod | classmethod | property | enum.Enum,
            ) or (_plain_text(member) is not None):
                self.put("member", name)
                self.reference(member)

    def hint(self, hint: Any, *, force: bool = False) -> None:
        """A type annotation: its form and, for each class in it, the class."""
        if isinstance(hint, type) and not typing.get_args(hint):
            self.reference(hint, force=force)
            return
        if isinstance(hint, str | typing.ForwardRef):
            self.put("annotation", str(hint))
            return
        origin = typing.get_origin(hint)
        self.put("generic", _name(origin) if origin is not None else _repr(hint))
        for argument in typing.get_args(hint):
            if isinstance(argument, type) or typing.get_origin(argument) is not None:
                self.hint(argument)  # followed only when it is user code, as a field's class
            else:  # Literal values, Annotated metadata, ...
                self.put(_plain_text(argument) or _repr(argument))


def _repr(value: Any) -> str:
    """repr, unless it holds an address (the default object repr): then the type's name."""
    text = repr(value)
    return _name(type(value)) if " at 0x" in text else text


# -- encoding the state ---------------------------------------------------------


def snapshot_key(aggregate: Aggregate[Any], aggregate_id: str) -> str:
    return f"{aggregate.name}/{aggregate_id}"


@functools.lru_cache(maxsize=256)
def _decoder(state_type: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(state_type)


def _round_trip(state: Any, state_type: Any) -> tuple[str, Any]:
    """The state as JSON and as it reads back (raises what msgspec raises)."""
    encoded = msgspec.json.encode(state)
    return encoded.decode(), _decoder(state_type).decode(encoded)


def take_snapshot(
    aggregate: Aggregate[Any], aggregate_id: str, state: Any, version: int, code: str
) -> Snapshot | None:
    """A snapshot of ``state``, or None when it would not read back as it is (a value
    that does not fit ``state_type``): a snapshot is an optimisation, it must never make
    a command fail, nor hand back another state."""
    try:
        encoded, decoded = _round_trip(state, aggregate.state_type)
    except (TypeError, ValueError, msgspec.EncodeError, msgspec.DecodeError) as error:
        log.warning("%s: not snapshotting a state that does not round-trip: %s", aggregate, error)
        return None
    difference = first_difference(decoded, state)
    if difference is not None:
        path, back, before = difference
        log.warning(
            "%s: not snapshotting %s: at %s, %r would read back as %r; declare a state_type "
            "that says what it is",
            aggregate,
            aggregate_id,
            path,
            before,
            back,
        )
        return None
    return Snapshot(
        aggregate_id=snapshot_key(aggregate, aggregate_id),
        aggregate=aggregate.name,
        version=version,
        code=code,
        state=encoded,
    )


def load_snapshot(
    aggregate: Aggregate[Any], snapshot: Snapshot | None, code: str
) -> tuple[Any, int] | None:
    """(state, version) from a snapshot made by the same code, else None."""
    if snapshot is None or snapshot.code != code:
        return None
    try:
        state = _decoder(aggregate.state_type).decode(snapshot.state)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # unreadable: fall back to the full stream
    return state, snapshot.version


# -- refusing what cannot round-trip ---------------------------------------------------


def check_snapshottable(aggregate: Aggregate[Any]) -> None:
    """RegistrationError, saying what to declare, when the aggregate's state would not
    come back from a snapshot as it went in: a type msgspec cannot decode, a type that
    leaves something open (a bare dict, list, tuple or set, Any, object), or an initial
    state that changes on the way (encoded, decoded as ``state_type``, compared)."""
    name, state_type, initial = aggregate.name, aggregate.state_type, aggregate.initial
    declare = f"declare Aggregate({name!r}, initial=..., state_type=...)"
    if state_type is type(None):
        raise RegistrationError(
            f"{name}: initial=None says nothing about the state snapshots must read back; "
            f"{declare} with the state's type, e.g. state_type=YourState | None"
        )
    try:
        info = msgspec.inspect.type_info(state_type)
    except (TypeError, ValueError) as error:
        raise RegistrationError(
            f"{name}: snapshots cannot decode the state type {state_type!r} ({error}); "
            f"{declare} with a type msgspec supports"
        ) from error
    open_at = _open_part(info, "state")
    if open_at is not None:
        where, cls = open_at
        if cls is not None:
            raise RegistrationError(
                f"{name}: snapshots cannot encode and decode {_type_text(cls)} (at {where}): "
                "msgspec does not know it; make the state a msgspec Struct, a dataclass or "
                "builtins, or leave snapshot_every unset"
            )
        raise RegistrationError(
            f"{name}: snapshots read the state back as {_type_text(state_type)}, which leaves "
            f"{where} open (a bare dict, list, tuple or set, Any or object comes back as "
            f"plain JSON: str keys, lists); {_advice(initial)}"
        )
    try:
        _, decoded = _round_trip(initial, state_type)
    except (TypeError, msgspec.EncodeError) as error:
        raise RegistrationError(
            f"{name}: snapshots cannot encode the initial state {initial!r} ({error}); make "
            "the state a msgspec Struct, a dataclass or builtins, or leave snapshot_every unset"
        ) from error
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise RegistrationError(
            f"{name}: the initial state {initial!r} does not read back as "
            f"{_type_text(state_type)} ({error}); declare the state_type it has"
        ) from error
    difference = first_difference(decoded, initial)
    if difference is not None:
        path, back, before = difference
        raise RegistrationError(
            f"{name}: the initial state does not survive a snapshot: at {path}, {before!r} "
            f"reads back as {back!r}; declare the state_type it has (state_type=...), or "
            "an initial state of the declared type"
        )


_WITH_FIELDS = (
    msgspec.inspect.StructType
    | msgspec.inspect.DataclassType
    | msgspec.inspect.TypedDictType
    | msgspec.inspect.NamedTupleType
)


def _open_part(
    info: Any, path: str, seen: set[int] | None = None
) -> tuple[str, type | None] | None:
    """Where a type leaves the decoded value's type to JSON, with the class msgspec does
    not know if that is why (else None: Any, a bare container)."""
    seen = set() if seen is None else seen
    if id(info) in seen:
        return None
    seen.add(id(info))
    if isinstance(info, msgspec.inspect.AnyType):
        return path, None
    if isinstance(info, msgspec.inspect.CustomType):
        return path, info.cls
    children: list[tuple[str, Any]] = []
    if isinstance(info, msgspec.inspect.DictType):
        children = [(f"{path}'s keys", info.key_type), (f"{path}'s values", info.value_type)]
    elif isinstance(
        info,
        msgspec.inspect.ListType
        | msgspec.inspect.SetType
        | msgspec.inspect.FrozenSetType
        | msgspec.inspect.VarTupleType,
    ):
        children = [(f"{path}'s items", info.item_type)]
    elif isinstance(info, msgspec.inspect.TupleType):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(info.item_types)]
    elif isinstance(info, msgspec.inspect.UnionType):
        children = [(path, member) for member in info.types]
    elif isinstance(info, _WITH_FIELDS):
        children = [(f"{path}.{field.name}", field.type) for field in info.fields]
    for where, child in children:
        found = _open_part(child, where, seen)
        if found is not None:
            return found
    return None


def _type_text(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__qualname__
    return repr(hint).replace("typing.", "").replace("decimal.", "").replace("datetime.", "")


def _advice(initial: Any) -> str:
    """What to declare: spelled from the initial state when it holds a sample of each
    part, else with placeholders and an example."""
    spelled = _spell(initial)
    if "?" not in spelled:
        return f"declare state_type={spelled}"
    if isinstance(initial, dict):
        return "declare state_type=dict[K, V] with the key and value types, e.g. dict[int, Decimal]"
    if isinstance(initial, list | tuple | set | frozenset):
        return "declare the item type, e.g. state_type=list[int] or tuple[str, ...]"
    return "declare a state_type whose every part says its type (no Any, no bare dict or list)"


def _spell(value: Any) -> str:
    """The type of a sample value, containers with their contents' types ("?" where a
    container is empty)."""
    if isinstance(value, dict):
        if not value:
            return "dict[?, ?]"
        key, item = next(iter(value.items()))
        return f"dict[{_spell(key)}, {_spell(item)}]"
    if isinstance(value, tuple) and type(value) is tuple:
        return f"tuple[{', '.join(_spell(item) for item in value)}]" if value else "tuple[?]"
    if isinstance(value, list | set | frozenset):
        inside = _spell(next(iter(value))) if value else "?"
        return f"{type(value).__name__}[{inside}]"
    try:
        known = msgspec.inspect.type_info(type(value))
    except (TypeError, ValueError):
        return "?"
    unknown = msgspec.inspect.AnyType | msgspec.inspect.CustomType
    return "?" if isinstance(known, unknown) else type(value).__qualname__


# -- comparing states ------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def first_difference(left: Any, right: Any, path: str = "state") -> tuple[str, Any, Any] | None:
    """The first place where two states differ, types included (``1`` is not ``1.0``
    nor ``'1'``, a tuple is not a list): ``(path, left value, right value)``, or None."""
    if type(left) is not type(right):
        return path, left, right
    pairs: Iterator[tuple[str, Any, Any]]
    if isinstance(left, msgspec.Struct):
        pairs = (
            (f"{path}.{name}", getattr(left, name, MISSING), getattr(right, name, MISSING))
            for name in left.__struct_fields__
        )
    elif isinstance(left, dict):
        keys = [*left, *(key for key in right if key not in left)]
        pairs = (  # a key on one side only is a difference too
            (f"{path}[{key!r}]", left.get(key, MISSING), right.get(key, MISSING)) for key in keys
        )
    elif isinstance(left, list | tuple):
        if len(left) != len(right):
            return path, left, right
        pairs = ((f"{path}[{i}]", a, b) for i, (a, b) in enumerate(zip(left, right, strict=True)))
    elif isinstance(left, set | frozenset):
        if left != right or any(
            type(a) is not type(b)
            for a, b in zip(sorted(left, key=repr), sorted(right, key=repr), strict=True)
        ):
            return path, left, right
        return None
    elif hasattr(left, "__dataclass_fields__"):
        pairs = (
            (f"{path}.{name}", getattr(left, name, MISSING), getattr(right, name, MISSING))
            for name in left.__dataclass_fields__
        )
    else:
        return None if left == right else (path, left, right)
    for where, a, b in pairs:
        found = first_difference(a, b, where)
        if found is not None:
            return found
    return None


def verify_snapshot(
    aggregate: Aggregate[Any],
    aggregate_id: str,
    loaded: tuple[Any, int],
    events: Iterable[Any],
) -> None:
    """Fold ``events`` (the stream from its start) up to the snapshot's version and
    compare with the snapshot's state; SnapshotMismatch at the first difference."""
    state, version = loaded
    stream = iter(events)
    folded, count = aggregate.fold_count(itertools.islice(stream, version), aggregate.initial)
    # read to the end: a store's stream may not be closable half way (a chain of batches)
    collections.deque(stream, maxlen=0)
    key = snapshot_key(aggregate, aggregate_id)
    if count < version:
        raise SnapshotMismatch(key, version, "version", version, count)
    difference = first_difference(state, folded)
    if difference is not None:
        path, snapshot_value, folded_value = difference
        raise SnapshotMismatch(key, version, path, snapshot_value, folded_value)
