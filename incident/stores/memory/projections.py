"""Read models in memory: a dict per table, named and owned as in the durable stores."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from ...errors import IncidentError
from ...messages import Projection
from ..arguments import readable_id
from ..read_model_rows import newer_or_equal, projection_json, projection_key, replacing_rows
from ..tables import TableOwners, TableSpec
from .opened import Opened

__all__ = ["MemoryProjectionStore"]

P = TypeVar("P", bound=Projection)


class MemoryProjectionStore:
    """Projections in a dict per table, guarded by one lock. Tables are named and owned
    as in the durable stores (:mod:`incident.stores.tables`), so what they refuse, memory
    refuses too. One from an event store's ``projections()`` shares its ``opened``: closing
    either closes both, as a durable store's shared database does."""

    def __init__(self, *, opened: Opened | None = None) -> None:
        self.opened = opened or Opened()
        self._lock = threading.RLock()
        self._owners = TableOwners()
        self._tables: dict[str, dict[str, Projection]] = {}

    def __repr__(self) -> str:
        return "MemoryProjectionStore()"

    def _spec(self, projection_type: type[Projection]) -> TableSpec:
        spec, _ = self._owners.claim(projection_type)
        return spec

    def _check(self, projection: Projection) -> tuple[TableSpec, str, Projection]:
        """The spec, the key and the row to keep: the projection read back from the JSON
        a durable store would write (aware datetime columns in UTC), so memory refuses
        and gives back what they do."""
        spec = self._spec(type(projection))
        key, _, row = projection_json(projection, spec)
        instants = {
            name: value.astimezone(dt.UTC)
            for name in spec.instant_columns
            if isinstance(value := getattr(row, name), dt.datetime) and value.tzinfo is not dt.UTC
        }
        return spec, key, msgspec.structs.replace(row, **instants) if instants else row

    @staticmethod
    def _read(spec: TableSpec, stored: Projection) -> Any:
        """A private copy of a stored row as the spec's type: a class redefined under
        the same name reads the rows its predecessor wrote, as from a durable table."""
        if type(stored) is spec.type:
            return msgspec.structs.replace(stored)
        try:
            return msgspec.convert(msgspec.to_builtins(stored), spec.type, strict=False)
        except msgspec.ValidationError as error:
            raise IncidentError(
                f"Row {projection_key(stored)!r} of table {spec.name!r} does not decode as "
                f"{spec.owner}: {error}"
            ) from error

    def _project(self, spec: TableSpec, key: str, row: Projection, projection: P) -> P:
        table = self._tables.setdefault(spec.name, {})
        stored = table.get(key)
        if spec.version is None or newer_or_equal(projection, stored):
            table[key] = row
            return projection
        assert stored is not None
        winner: P = self._read(spec, stored)
        return winner

    def project(self, projection: P) -> P:
        self.opened.check()
        spec, key, row = self._check(projection)
        with self._lock:
            return self._project(spec, key, row, projection)

    def project_many(self, projections: Iterable[Projection]) -> None:
        self.opened.check()
        checked = [(*self._check(p), p) for p in projections]
        with self._lock:
            for spec, key, row, projection in checked:
                self._project(spec, key, row, projection)

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        checked = self.checked_tables(
            {projection_type: replacing_rows(projection_type, projections)}
        )
        self.install(checked)
        return sum(map(len, checked.values()))

    def checked_tables(
        self, tables: Mapping[type[Projection], Iterable[Projection]]
    ) -> dict[str, dict[str, Projection]]:
        """Each table's rows (those ``replacing_rows`` keeps) checked and keyed, by table
        name, ready for :meth:`install`; nothing is written."""
        self.opened.check()
        checked: dict[str, dict[str, Projection]] = {}
        for projection_type, projections in tables.items():
            table = checked[self._spec(projection_type).name] = {}
            for projection in projections:
                _, key, row = self._check(projection)
                table[key] = row
        return checked

    def install(self, checked: Mapping[str, dict[str, Projection]]) -> None:
        """Swap the tables :meth:`checked_tables` made, all at once."""
        self.opened.check()
        with self._lock:
            self._tables.update(checked)

    def get(self, projection_type: type[P], key: str) -> P | None:
        self.opened.check()
        if not readable_id(key):
            return None  # no row can have it
        spec = self._spec(projection_type)
        with self._lock:
            stored = self._tables.get(spec.name, {}).get(key)
        found: P | None = None if stored is None else self._read(spec, stored)
        return found

    def all(self, projection_type: type[P]) -> list[P]:
        self.opened.check()
        spec = self._spec(projection_type)
        with self._lock:
            rows = sorted(self._tables.get(spec.name, {}).items())  # by key, as SQL stores
        return [self._read(spec, row) for _, row in rows]

    def close(self) -> None:
        """Closes the event store it came from too (they share ``opened``)."""
        self.opened.close()
