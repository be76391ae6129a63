"""The public API: the names DESIGN.md promises, all documented, errors re-exported."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

import incident
import incident.errors

DESIGN_NAMES = {
    "Command",
    "Event",
    "Projection",
    "Recorded",
    "Aggregate",
    "EventHandler",
    "CommandHandler",
    "open_event_store",
    "open_projection_store",
    "ANY",
    "EventStore",
    "ProjectionStore",
    "errors",
}
DESIGN_ERRORS = {
    "IncidentError",
    "InvalidCommand",
    "Rejected",
    "ConcurrencyError",
    "UnknownEventType",
    "CorruptEvent",
    "StoreError",
}


def test_all_holds_at_least_what_design_lists() -> None:
    """Every name DESIGN.md makes public is in incident.__all__."""
    missing = (DESIGN_NAMES | DESIGN_ERRORS) - set(incident.__all__)
    assert not missing, f"missing from incident.__all__: {sorted(missing)}"


def test_all_is_sorted_without_duplicates() -> None:
    """__all__ is one sorted list, so additions are easy to review."""
    assert incident.__all__ == sorted(set(incident.__all__))


@pytest.mark.parametrize("name", incident.__all__)
def test_every_public_name_exists_and_is_documented(name: str) -> None:
    """Each exported name resolves and carries its own docstring (values: their type's)."""
    assert hasattr(incident, name), name
    value = getattr(incident, name)
    if name == "__version__":
        assert isinstance(value, str) and value.count(".") == 2
        return
    if inspect.isclass(value) or inspect.isroutine(value) or inspect.ismodule(value):
        documented = value.__doc__
    else:  # a constant such as ANY: documented by its class
        documented = type(value).__doc__
    assert documented and documented.strip(), f"incident.{name} has no docstring"


@pytest.mark.parametrize(
    "cls",
    [
        incident.Aggregate,
        incident.EventHandler,
        incident.EventTypes,
        incident.Attempt,
        incident.AsyncCommandHandler,
        incident.AsyncEventStore,
        incident.AsyncProjectionStore,
    ],
)
def test_public_methods_of_the_core_classes_are_documented(cls: type[Any]) -> None:
    """help() in a notebook says something for every public method and property."""
    undocumented = []
    for attribute, member in vars(cls).items():
        if attribute.startswith("_"):
            continue
        function = member.fget if isinstance(member, property) else member
        if callable(function) and not (function.__doc__ or "").strip():
            undocumented.append(attribute)
    assert not undocumented, f"{cls.__name__}: {undocumented}"


@pytest.mark.parametrize("name", sorted(incident.errors.__all__))
def test_errors_are_re_exported_and_share_one_base(name: str) -> None:
    """incident.X is incident.errors.X, and every error is an IncidentError."""
    error = getattr(incident.errors, name)
    assert getattr(incident, name) is error
    assert issubclass(error, incident.IncidentError)


def test_error_families_are_also_builtin_errors() -> None:
    """Callers catching ValueError / LookupError / TypeError keep working."""
    assert issubclass(incident.InvalidCommand, ValueError)
    assert issubclass(incident.UnknownEventType, LookupError)
    assert issubclass(incident.RoutingError, LookupError)
    assert issubclass(incident.RegistrationError, TypeError)


def error_sample(cls: type[incident.IncidentError]) -> incident.IncidentError:
    """An instance of any error class, its required arguments filled by annotation."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except ValueError:  # Exception's own __init__: one message
        return cls(f"{cls.__name__} message")
    args: list[Any] = []
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            continue
        annotation = str(parameter.annotation)
        if "list" in annotation or "Iterable" in annotation:
            args.append(["a", "b"])
        elif "str" in annotation:
            args.append(f"{parameter.name}-value")
        else:
            args.append(7)
    return cls(*args)


@pytest.mark.parametrize("name", sorted(incident.errors.__all__))
def test_errors_survive_pickling(name: str) -> None:
    """Errors cross process boundaries (multiprocessing, pytest-xdist) with their fields."""
    error = error_sample(getattr(incident.errors, name))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_error_fields() -> None:
    """The errors keep what went wrong as attributes, not only in the message."""
    conflict = incident.ConcurrencyError("A1", 2, 3)
    assert (conflict.aggregate_id, conflict.expected, conflict.actual) == ("A1", 2, 3)
    assert "nothing was written" in str(conflict)
    rejected = incident.Rejected("no_enough_balance")
    assert (rejected.reason, str(rejected)) == ("no_enough_balance", "no_enough_balance")
    invalid = incident.InvalidCommand("Deposit", "amount", "Expected `int` >= 1")
    assert (invalid.command_type, invalid.field) == ("Deposit", "amount")
    assert str(invalid) == "Invalid Deposit: Expected `int` >= 1 - at `amount`"
