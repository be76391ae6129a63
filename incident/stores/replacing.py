"""A replay's commit, shared by the checkpoint stores: ``reset(..., tables=...)`` swaps
each projection table for its rebuilt rows and sets the checkpoint.

When the projection store shares the checkpoint store's database, one transaction does
both, with the dead letters dropped. Otherwise no transaction spans the two databases,
so the checkpoint (and the dead letters) go first, the tables after. A crash between
them leaves the old tables behind a checkpoint at the end of the replay and no dead
letters: the runner then writes only rows of later events (never an older row over a
newer one), and the next replay rebuilds what the old tables lack. The other order
would leave the rebuilt tables behind the old checkpoint and the old dead letters: the
runner would handle the replayed events again, and retrying the dead letters would
write their older rows over the rebuilt ones (a read model without a ``version`` field
moves backwards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import IncidentError
from ..messages import Projection
from .protocols import ProjectionStore, ReplaceableProjectionStore
from .read_model_rows import replacing_tables

__all__ = ["Tables", "checked_tables", "replace_elsewhere"]

#: the rows of each projection type that replace its table
Tables = Mapping[type[Projection], Sequence[Projection]]


def checked_tables(
    tables: Tables | None, projection_store: ProjectionStore | None, shared: bool
) -> dict[type[Projection], list[Projection]]:
    """The rows each table keeps, checked before anything is written (Unstorable, or
    IncidentError); IncidentError too for tables without a projection store, or for
    one in another database that cannot replace tables."""
    kept = replacing_tables(tables or {})
    if kept and projection_store is None:
        raise IncidentError("reset was given tables but no projection_store to write them to")
    if kept and not shared and not isinstance(projection_store, ReplaceableProjectionStore):
        raise IncidentError(f"{projection_store!r} cannot replace tables")
    return kept


def replace_elsewhere(
    tables: Mapping[type[Projection], list[Projection]], projection_store: ProjectionStore | None
) -> None:
    """In a projection store of another database, once the checkpoint has moved: each
    table swapped in a transaction of its own (see the module's docstring)."""
    if tables:
        assert isinstance(projection_store, ReplaceableProjectionStore)  # checked_tables
        for projection_type, rows in tables.items():
            projection_store.replace_all(projection_type, rows)
