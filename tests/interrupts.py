"""Interrupting the main thread from another, as Ctrl-C would, for the tests of what a
caller interrupted while it waits leaves behind: while :func:`sigusr1_raises` holds,
SIGUSR1 raises in the main thread, and :func:`signal_main_when` sends it there once a
condition holds. Nothing is timed: the waits are bounded waits on a condition."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

WAIT = 10.0  # seconds a bounded wait on a condition may take at most


class Interrupted(BaseException):
    """What Ctrl-C would raise, without being KeyboardInterrupt."""


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Return once ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@contextmanager
def sigusr1_raises(error: type[BaseException] = Interrupted) -> Iterator[None]:
    """Inside, SIGUSR1 raises ``error`` in the main thread, at its first delivery (a
    signal sent again, in case the first landed too early, finds it raised already);
    on leaving, the handler there was before is put back."""
    assert threading.current_thread() is threading.main_thread()  # signals go there
    raised = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise error

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def signal_main() -> None:
    """Send SIGUSR1 to the main thread."""
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)


def signal_main_when(
    condition: Callable[[], bool], *, again_while: Callable[[], bool] | None = None
) -> threading.Thread:
    """A thread, started, that signals the main thread once ``condition()`` holds; with
    ``again_while``, it signals again every 50 ms for as long as that holds (a signal
    that lands just before the main thread starts to wait does not end the wait)."""

    def send() -> None:
        wait_until(condition)
        deadline = time.monotonic() + WAIT
        signal_main()
        while again_while is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            if not again_while():
                return
            signal_main()

    sender = threading.Thread(target=send)
    sender.start()
    return sender
