"""A subscription waits longer after each failure of its database, and no longer once
the database answers again."""

from __future__ import annotations

import logging
import re
import threading

import pytest

import incident
from incident.examples import bank


def pauses_of_a_run(
    subscription: incident.Subscription, stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> list[float]:
    """Runs the subscription in a thread until ``stop`` is set (within 10 s) and returns
    the pauses, in seconds, its warnings announced after failures."""
    caplog.set_level(logging.WARNING, logger="incident.subscriptions")
    runner = threading.Thread(target=subscription.run, args=(stop,), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive()
    return [float(m) for m in re.findall(r"trying again in ([\d.]+)s", caplog.text)]


def test_a_step_that_works_resets_the_outage_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Four failed steps, one that works, then another failure: the pause after that
    failure starts again from ``backoff``, though the subscription never let go of
    its lock in between."""
    app = bank.build("memory://", subscriptions=True)
    subscription = incident.Subscription(
        bank.bank_projections, app, backoff=0.01, outage_backoff=5.0, idle=0.01
    )
    outcomes = ["down"] * 4 + ["up"] + ["down"] + ["stop"]
    stop = threading.Event()

    def step() -> int:
        outcome = outcomes.pop(0) if outcomes else "stop"
        if outcome == "down":
            raise incident.StoreError("Postgres failed reading the log: the server is gone")
        if outcome == "stop":
            stop.set()
        return 0

    monkeypatch.setattr(subscription, "step", step)
    pauses = pauses_of_a_run(subscription, stop, caplog)
    assert pauses == [0.01, 0.02, 0.04, 0.08, 0.01]


def test_a_lock_attempt_that_works_again_resets_the_outage_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Three lock attempts fail, the fourth works, and the first step after it fails:
    the pause after that step starts again from ``backoff``."""
    app = bank.build("memory://", subscriptions=True)
    subscription = incident.Subscription(
        bank.bank_projections, app, backoff=0.01, outage_backoff=5.0, idle=0.01
    )
    stop = threading.Event()
    failures = [3]
    acquire = subscription._lock.acquire
    steps = ["down", "stop"]

    def failing_acquire(timeout: float) -> bool:
        if failures[0]:
            failures[0] -= 1
            raise incident.StoreError("Postgres failed taking the lock: the server is gone")
        return acquire(timeout=timeout)

    def step() -> int:
        if (steps.pop(0) if steps else "stop") == "down":
            raise incident.StoreError("Postgres failed reading the log: the server is gone")
        stop.set()
        return 0

    monkeypatch.setattr(subscription._lock, "acquire", failing_acquire)
    monkeypatch.setattr(subscription, "step", step)
    pauses = pauses_of_a_run(subscription, stop, caplog)
    assert pauses == [0.01, 0.02, 0.04, 0.01]
