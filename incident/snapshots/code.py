"""The snapshot key: a hash of the code and data that decide an aggregate's state.

A snapshot is only trusted when its ``code`` equals :func:`code_key` of the running
code: a hash of everything that decides what the state is (the aggregate's
``snapshot_version``, its state type, apply functions, upcasters and event types, and
the functions, classes and constants of the user's own modules that they reach). The
hash is made of code and data, never of addresses or ids, so an unchanged program gets
the same key in every process, and a changed one gets another, whose old snapshots are
then ignored.
"""

from __future__ import annotations

import datetime as dt
import decimal
import dis
import enum
import functools
import hashlib
import site
import sys
import sysconfig
import types
import typing
import uuid
from pathlib import Path
from typing import Any

from ..aggregate import Aggregate
from ..messages import event_type_name

__all__ = ["code_key"]

# Bumped when the way the key is computed changes, so keys of the old way never match.
_KEY_FORMAT = "incident-snapshot-key/2"


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
