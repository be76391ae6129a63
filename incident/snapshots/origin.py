"""Whose code a module is: the user's (followed into by the snapshot key) or someone
else's (incident, the standard library, anything installed: counted by name only)."""

from __future__ import annotations

import functools
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

from ..aggregate import Aggregate

__all__ = ["is_library", "own_packages"]


def own_packages(aggregate: Aggregate[Any]) -> frozenset[str]:
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


def is_library(module_name: str, own: frozenset[str]) -> bool:
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
