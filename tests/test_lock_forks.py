"""A handler lock does not cross a fork: a child forked from a runner (multiprocessing,
gunicorn --preload) neither holds its parent's lock, nor frees it by releasing its
copy, nor keeps it taken once the parent is gone, so a standby can take over."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import Admin

import incident
from incident.stores import checkpoint_store_for

HOLDER = Path(__file__).with_name("fork_lock_holder.py")


def test_a_forked_child_neither_holds_nor_frees_nor_keeps_its_parents_lock(
    initialized_url: str,
) -> None:
    done = subprocess.run(
        [sys.executable, str(HOLDER), initialized_url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    try:
        assert report["child_saw_held"] is False
        assert report["another_took_it"] is False  # the child's release left it taken
        with closing(incident.open_event_store(initialized_url)) as store:
            standby = checkpoint_store_for(store).lock("h")
            try:  # the parent died: its lock is free, though its child lives on
                assert standby.acquire(timeout=10)
            finally:
                standby.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(report["child"], signal.SIGKILL)


SESSION_HOLDER = Path(__file__).with_name("fork_session_holder.py")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forked_child_does_not_keep_a_dead_parents_session_alive(
    postgres_url: str, postgres_admin: Admin, mode: str
) -> None:
    """A process dies in the middle of a transaction holding a lock (an append's) while
    a child it forked lives on. The child must not keep the parent's session open:
    the server ends it, rolls it back and frees the lock, or every writer would wait
    for the child to exit."""
    key = random.randrange(1, 2**31)
    done = subprocess.run(
        [sys.executable, str(SESSION_HOLDER), postgres_url, str(key), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    child = int(done.stdout)
    try:
        deadline = time.monotonic() + 15
        while not postgres_admin.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the dead parent's session still holds its lock"
            time.sleep(0.1)
        postgres_admin.execute("SELECT pg_advisory_unlock(%s)", [key])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
