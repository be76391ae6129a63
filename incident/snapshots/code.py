"""The snapshot key: a hash of the code and data that decide an aggregate's state.

A snapshot is only trusted when its ``code`` equals :func:`code_key` of the running
code: a hash of everything that decides what the state is (the aggregate's
``snapshot_version``, its state type and initial state, apply functions, upcasters and
event types, and the functions, classes and constants of the user's own modules that
they reach, :mod:`incident.snapshots.names` says how). The
hash is made of code and data, never of addresses or ids, so an unchanged program gets
the same key in every process, and a changed one gets another, whose old snapshots are
then ignored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import fractions
import functools
import hashlib
import operator
import re
import types
import typing
import uuid
from typing import Any

import msgspec

from ..aggregate import Aggregate
from ..messages import event_type_name
from .names import imported, names_used
from .origin import is_library, own_packages

__all__ = ["code_key"]

# Bumped when the way the key is computed changes, so keys of the old way never match.
_KEY_FORMAT = "incident-snapshot-key/3"


def code_key(aggregate: Aggregate[Any]) -> str:
    """A hash of what decides the aggregate's state, the same in every process that runs
    the same code: its name and ``snapshot_version``, its state type, each apply function
    and upcaster, each event type (stored name, schema version, fields), and, followed
    through globals, closures and nested code, the functions, classes and constants of
    the user's modules they use (not incident's, the standard library's or those
    installed in site-packages, except the aggregate's own package), and the initial
    state."""
    hasher = _CodeHasher(own_packages(aggregate))
    hasher.put(_KEY_FORMAT, aggregate.name, str(aggregate.snapshot_version))
    hasher.put("state")
    hasher.hint(aggregate.state_type, force=True)
    hasher.put("initial")  # every fold starts from it
    hasher.reference(aggregate.initial)
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


def _name(value: Any) -> str:
    module = getattr(value, "__module__", None) or "?"
    return f"{module}:{getattr(value, '__qualname__', type(value).__qualname__)}"


_SCALARS = fractions.Fraction | range
# library objects whose repr says all they do, with no address in it
_BY_REPR = (re.Pattern, operator.itemgetter, operator.attrgetter, operator.methodcaller)


def _plain_text(value: Any) -> str | None:
    """A stable text for plain data (scalars, dates, decimals, enum members, and
    containers of them, sets sorted), or None for anything else."""
    if value is None or isinstance(
        value, bool | int | float | complex | str | bytes | decimal.Decimal | uuid.UUID | _SCALARS
    ):
        return f"{type(value).__name__}:{value!r}"
    if value is Ellipsis:
        return "..."
    if isinstance(value, enum.Enum):
        return f"enum:{_name(type(value))}.{value.name}={_plain_text(value.value)}"
    if isinstance(value, dt.date | dt.time | dt.timedelta | dt.tzinfo):  # datetime is a date
        return f"{type(value).__name__}:{_repr(value)}"
    if isinstance(value, decimal.Context):  # its settings, not its flags (they change)
        traps = sorted(trap.__name__ for trap, on in value.traps.items() if on)
        settings = (value.prec, value.rounding, value.Emin, value.Emax, value.clamp)
        return f"context:{settings}/{value.capitals}/{','.join(traps)}"
    if isinstance(value, tuple | list):
        items = [_plain_text(item) for item in value]
        return None if None in items else f"{type(value).__name__}[{','.join(items)}]"  # type: ignore[arg-type]
    if isinstance(value, set | frozenset):
        items = [_plain_text(item) for item in value]
        if None in items:
            return None
        return f"{type(value).__name__}{{{','.join(sorted(items))}}}"  # type: ignore[arg-type]
    if isinstance(value, dict):  # in order: code may iterate it (sets, unordered, sorted)
        pairs = [(_plain_text(key), _plain_text(item)) for key, item in value.items()]
        if any(key is None or item is None for key, item in pairs):
            return None
        return f"dict{{{','.join(f'{key}:{item}' for key, item in pairs)}}}"
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
            self._library[module] = is_library(module, self._own)
        return not self._library[module]

    # -- values ---------------------------------------------------------------

    def reference(self, value: Any, *, force: bool = False) -> None:
        """Whatever a name in user code resolves to."""
        if isinstance(value, types.MethodType):  # its object counts: Pricing(rate=2).apply
            self.put("bound")
            self.reference(value.__self__)
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
        elif isinstance(value, functools.cached_property):
            self.put("cached_property")
            self.reference(value.func)
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
        """Data, code and objects (functions and classes go through :meth:`reference`)."""
        text = _plain_text(value)
        if text is not None:
            self.put(text)
            if type(value).__module__ != "builtins":  # an enum's, an int subclass's methods
                self.reference(type(value))
        elif isinstance(value, types.CodeType):
            self.code(value, namespace or {})
        elif isinstance(value, tuple | list | set | frozenset | dict):
            self.put(type(value).__name__)  # holding something not plain: each in turn
            items = value.items() if isinstance(value, dict) else value
            if isinstance(value, set | frozenset):  # in an order that is not the hashes'
                items = sorted(value, key=lambda item: _plain_text(item) or _name(item))
            for item in items:
                self.reference(item)
        elif isinstance(value, types.ModuleType):
            self.put("module", value.__name__)
        elif callable(wrapped := _wrapped(value)):  # functools.cache and friends
            self.put("wrapped", _name(value))
            self.reference(wrapped)
        elif callable(value) and hasattr(value, "__qualname__"):  # a builtin function
            self.put("callable", _name(value))
            owner = getattr(value, "__self__", None)  # RATES.get: RATES counts
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.reference(owner)
        elif isinstance(value, _BY_REPR):
            self.put("repr", _name(type(value)), repr(value))
        elif isinstance(value, msgspec.Struct | types.SimpleNamespace) or dataclasses.is_dataclass(
            value
        ):
            self._record(value)  # data: a constant, a default, the initial state
        else:  # an object: its class, not its contents (it may be a connection, a cache)
            self.put("object")
            self.reference(type(value))

    def _record(self, record: Any) -> None:
        """A Struct, dataclass or SimpleNamespace: its class and each field's value."""
        if not self._enter(record):
            return
        self.put("record")
        self.reference(type(record))
        if isinstance(record, msgspec.Struct):
            fields = record.__struct_fields__
        elif isinstance(record, types.SimpleNamespace):
            fields = tuple(vars(record))
        else:
            fields = tuple(field.name for field in dataclasses.fields(record))
        for field in fields:
            self.put("field", field)
            self.reference(getattr(record, field, None))

    # -- code -----------------------------------------------------------------

    def function(self, function: types.FunctionType) -> None:
        if not self._enter(function):
            return
        self.put("def", function.__qualname__)
        self.code(function.__code__, function.__globals__, docstring=function.__doc__)
        self.value(function.__defaults__)
        self.value(function.__kwdefaults__)
        for name, attribute in sorted(vars(function).items()):  # __wrapped__, registry...
            self.put("attribute", name)
            proxy = isinstance(attribute, types.MappingProxyType)
            self.reference(dict(attribute) if proxy else attribute)
        for cell in function.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not assigned yet
                self.put("empty cell")
                continue
            self.reference(contents)

    def code(
        self, code: types.CodeType, namespace: dict[str, Any], docstring: str | None = None
    ) -> None:
        """Bytecode, names and constants (but a function's docstring, its first constant);
        nested code objects (lambdas, generator expressions, comprehensions) by their own
        content, never their repr, which holds an address."""
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
        for index, constant in enumerate(code.co_consts):
            if index == 0 and docstring is not None and constant == docstring:
                continue  # prose: were it also used as a value, the bytecode would say so
            self.value(constant, namespace)
        names = names_used(code)
        for name in names.globals:
            if name in namespace:  # else a builtin
                self.put("global", name)
                found = namespace[name]
                if isinstance(found, types.ModuleType):
                    self._module(found, names.attributes)
                else:
                    self.reference(found)
        for name, level, fromlist in names.imports:  # an import inside a function
            self.put("import", name, str(level), *fromlist)
            module = imported(name, level, namespace)
            for submodule in fromlist if hasattr(module, "__path__") else ():
                if not hasattr(module, submodule):  # from package import module
                    imported(f"{name}.{submodule}" if name else submodule, level, namespace)
            if module is not None:
                self._module(module, names.attributes)

    def _module(self, module: types.ModuleType, names: tuple[str, ...]) -> None:
        """A module used by user code: what the code may take from it, ``module.helper``
        or ``package.module.helper`` (any attribute the code reads that the module has)."""
        self.put("module", module.__name__)
        if not self._followed(module):
            return
        for name in names:
            found = getattr(module, name, None)
            if isinstance(found, types.ModuleType):
                if found.__name__.startswith(f"{module.__name__}."):  # a submodule
                    self._module(found, names)
            elif found is not None:
                self.put("attribute", name)
                self.reference(found)

    # -- types ----------------------------------------------------------------

    def klass(self, cls: type) -> None:
        """A class: its bases, field layout and annotations, and what its body defines
        (methods, special methods, nested classes, constants, enum members)."""
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
            # of the special names, the methods only (__init__, __add__, __post_init__...)
            if name.startswith("__") and not isinstance(
                member, types.FunctionType | staticmethod | classmethod
            ):
                continue
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
        if isinstance(hint, typing.NewType):
            self.put("newtype", _name(hint))
            self.hint(hint.__supertype__)
            return
        origin = typing.get_origin(hint)
        self.put("generic", _name(origin) if origin is not None else _repr(hint))
        if isinstance(origin, type):  # followed when it is the user's: Box[int]
            self.reference(origin)
        for argument in typing.get_args(hint):
            if isinstance(argument, type) or typing.get_origin(argument) is not None:
                self.hint(argument)  # followed only when it is user code, as a field's class
            else:  # Literal values, Annotated metadata, ...
                self.put(_plain_text(argument) or _repr(argument))


def _wrapped(value: Any) -> Any:
    """What a wrapper object (``functools.cache``) wraps, read without running any
    ``__getattr__`` of the object, or None."""
    try:
        return vars(value).get("__wrapped__")
    except TypeError:  # no __dict__
        return None


def _repr(value: Any) -> str:
    """repr, unless it holds an address (the default object repr): then the type's name."""
    text = repr(value)
    return _name(type(value)) if " at 0x" in text else text
