"""Projection stores in another database than any checkpoint store's, for the checkpoint
store contract's resets (replay's commit) of tables elsewhere."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from ...messages import Projection
from ...stores import CheckpointStore, MemoryProjectionStore

__all__ = ["ElsewhereProjections", "UnreplaceableProjections"]

P = TypeVar("P", bound=Projection)


class ElsewhereProjections:
    """Read models in another database than any checkpoint store's (a memory store
    inside, which alone memory's would share), whose ``replace_all`` notes the
    checkpoint it sees and may fail, as a crash there would."""

    def __init__(self, checkpoints: CheckpointStore, *, fail: bool = False) -> None:
        self.rows, self.checkpoints, self.fail = MemoryProjectionStore(), checkpoints, fail
        self.seen: list[tuple[str, int, int]] = []  # table, checkpoint, dead letters

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        seen = (projection_type.__name__, self.checkpoints.load("h"))
        self.seen.append((*seen, len(self.checkpoints.parked("h"))))
        if self.fail:
            raise RuntimeError("killed before the tables were swapped")
        return self.rows.replace_all(projection_type, projections)

    def project(self, projection: P) -> P:
        return self.rows.project(projection)

    def get(self, projection_type: type[P], key: str) -> P | None:
        return self.rows.get(projection_type, key)

    def all(self, projection_type: type[P]) -> list[P]:
        return self.rows.all(projection_type)

    def close(self) -> None:
        self.rows.close()


class UnreplaceableProjections:
    """A projection store (of another database) without ``replace_all``."""

    def project(self, projection: P) -> P:
        return projection

    def get(self, projection_type: type[P], key: str) -> P | None:
        return None

    def all(self, projection_type: type[P]) -> list[P]:
        return []

    def close(self) -> None:
        pass
