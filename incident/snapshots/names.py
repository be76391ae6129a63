"""What a code object names, for the snapshot key: the globals, attributes and modules
it reads, and the modules its imports load."""

from __future__ import annotations

import dis
import functools
import importlib
import importlib.util
import types
import typing
from typing import Any

__all__ = ["Names", "imported", "names_used"]

_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
# IMPORT_FROM reads a name from the module just imported, as LOAD_ATTR does
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"})


class Names(typing.NamedTuple):
    globals: tuple[str, ...]
    attributes: tuple[str, ...]
    imports: tuple[tuple[str, int, tuple[str, ...]], ...]  # (module, level, fromlist)


@functools.lru_cache(maxsize=4096)
def names_used(code: types.CodeType) -> Names:
    """The global names a code object reads, the attribute names it reads and the
    modules it imports, in order of first use: co_names mixes them, and an attribute
    (``event.line``) must not be looked up as a global that happens to share its name."""
    globals_used: dict[str, None] = {}
    attributes: dict[str, None] = {}
    imports: dict[tuple[str, int, tuple[str, ...]], None] = {}
    constants: list[Any] = [0, None]  # the last two: an import's level and fromlist
    for instruction in dis.get_instructions(code):
        if instruction.opname in _GLOBAL_LOADS:
            globals_used[instruction.argval] = None
        elif instruction.opname in _ATTRIBUTE_LOADS:
            attributes[instruction.argval] = None
        elif instruction.opname == "IMPORT_NAME":
            level, fromlist = constants
            imports[(instruction.argval, level, fromlist or ())] = None
        if instruction.opname == "LOAD_CONST":
            constants = [constants[-1], instruction.argval]
    return Names(tuple(globals_used), tuple(attributes), tuple(imports))


def imported(name: str, level: int, namespace: dict[str, Any]) -> types.ModuleType | None:
    """The module an import in user code names, imported as that code would, or None
    when it does not import here."""
    try:
        if level:
            package = namespace.get("__package__") or namespace.get("__name__", "")
            name = importlib.util.resolve_name("." * level + name, package)
        return importlib.import_module(name)
    except Exception:  # its import fails here: the name is in the key all the same
        return None
