"""Turns: threads of one process that collided on an aggregate wait for each other."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import pytest

from incident.command_handler.turns import Turns

A = ("bank_account", "A")
B = ("bank_account", "B")


def test_an_aggregate_nobody_collided_on_takes_no_turn() -> None:
    turns = Turns()
    with turns.turn(A):
        assert turns.waiting(A) == 0


def test_after_a_collision_threads_take_turns_and_nothing_is_left_behind() -> None:
    turns = Turns()
    turns.collided(A)
    inside, order = threading.Event(), []

    def second() -> None:
        with turns.turn(A):
            order.append("second")

    with turns.turn(A):
        other = threading.Thread(target=second)
        other.start()
        while turns.waiting(A) < 2:  # the other thread is waiting for this turn
            inside.wait(0.001)
        order.append("first")
    other.join(timeout=10)
    assert order == ["first", "second"]
    assert turns.waiting(A) == 0
    assert not turns._turns  # no lock kept for an aggregate nobody holds


def test_other_aggregates_do_not_wait() -> None:
    turns = Turns()
    turns.collided(A)
    turns.collided(B)
    with turns.turn(A):
        done = threading.Event()
        threading.Thread(target=lambda: (turns.turn(B).__enter__(), done.set())).start()
        assert done.wait(10)


def test_a_thread_may_take_its_own_turn_again() -> None:
    """A listener that dispatches to its own aggregate does not deadlock its thread."""
    turns = Turns()
    turns.collided(A)
    with turns.turn(A), turns.turn(A):
        assert turns.waiting(A) == 2


def test_only_the_most_recent_collisions_are_remembered() -> None:
    turns = Turns(remember=2)
    for key in (A, B, ("bank_account", "C")):
        turns.collided(key)
    assert list(turns._contended) == [B, ("bank_account", "C")]


def _take_in_child(turns: Turns, results: Any) -> None:
    with turns.turn(A):
        results.put("taken")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork")
def test_a_child_forked_while_a_parent_thread_holds_a_turn_can_take_it() -> None:
    turns = Turns()
    turns.collided(A)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with turns.turn(A):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_take_in_child, args=(turns, results))
    child.start()
    try:
        assert results.get(timeout=30) == "taken"
    finally:
        release.set()
        holder.join(timeout=10)
        child.join(timeout=30)
    assert child.exitcode == 0
