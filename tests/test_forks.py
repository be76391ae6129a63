"""renew_in_forked_children: what must not cross a fork is renewed in the child."""

from __future__ import annotations

import gc
import multiprocessing
import weakref
from typing import Any

import pytest

from incident._forks import renew_in_forked_children


class Owner:
    def __init__(self) -> None:
        self.renewed = False
        renew_in_forked_children(self.renew)

    def renew(self) -> None:
        self.renewed = True


def test_a_renewal_does_not_keep_its_owner_alive() -> None:
    owner = Owner()
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None


def _report(owner: Owner, results: Any) -> None:
    results.put(owner.renewed)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork")
def test_a_forked_child_renews_before_it_runs_anything() -> None:
    owner = Owner()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_report, args=(owner, results))
    child.start()
    assert results.get(timeout=30) is True
    child.join(timeout=30)
    assert owner.renewed is False  # the parent keeps its own
