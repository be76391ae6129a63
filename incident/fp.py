"""A small typed seam over toolz, which ships no type information."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar, cast

import toolz

__all__ = ["accumulate", "groupby", "partition_all"]

K = TypeVar("K")
S = TypeVar("S")
T = TypeVar("T")


def accumulate(step: Callable[[S, T], S], items: Iterable[T], initial: S) -> Iterator[S]:
    """Running reductions, starting with ``initial``.

    >>> list(accumulate(lambda a, b: a + b, [1, 2, 3], 0))
    [0, 1, 3, 6]
    """
    return cast(Iterator[S], toolz.accumulate(step, items, initial))


def partition_all(size: int, items: Iterable[T]) -> Iterator[tuple[T, ...]]:
    """Split ``items`` into tuples of at most ``size``.

    >>> list(partition_all(2, [1, 2, 3]))
    [(1, 2), (3,)]
    """
    return cast(Iterator[tuple[T, ...]], toolz.partition_all(size, items))


def groupby(key: Callable[[T], K], items: Iterable[T]) -> dict[K, list[T]]:
    """``items`` by ``key``: groups in the order of their first item, each in the order
    of ``items``.

    >>> groupby(len, ["ab", "c", "de"])
    {2: ['ab', 'de'], 1: ['c']}
    """
    return cast(dict[K, list[T]], toolz.groupby(key, items))
