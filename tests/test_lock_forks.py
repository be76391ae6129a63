"""A handler lock does not cross a fork: a child forked from a runner (multiprocessing,
gunicorn --preload) neither holds its parent's lock, nor frees it by releasing its
copy, nor keeps it taken once the parent is gone, so a standby can take over."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from contextlib import closing
from pathlib import Path

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
