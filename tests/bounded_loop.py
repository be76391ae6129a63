"""Run a coroutine on a fresh event loop within a bound, as the fault tests need: past
the bound, or if tasks are still running once it returned and they were cancelled, the
test fails naming what each task was waiting on (instead of hanging the run)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_bounded(main: Coroutine[Any, Any, T], seconds: float, leftovers: float = 15.0) -> T:
    """``asyncio.run(main)``, failing after ``seconds`` (main still running) or when
    the tasks main left behind do not end within ``leftovers`` seconds of being
    cancelled; the failure holds every pending task's stack."""

    async def bounded() -> T:
        task = asyncio.ensure_future(main)
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            stacks = _stacks()
            task.cancel()
            raise AssertionError(f"still running after {seconds} s:\n{stacks}")
        left = asyncio.all_tasks() - {asyncio.current_task()}
        for other in left:
            other.cancel()
        if left:
            _, pending = await asyncio.wait(left, timeout=leftovers)
            if pending:
                raise AssertionError(
                    f"{len(pending)} task(s) did not end when cancelled:\n{_stacks(pending)}"
                )
        return task.result()

    return asyncio.run(bounded())


def _stacks(tasks: set[asyncio.Task[Any]] | None = None) -> str:
    out = io.StringIO()
    for task in tasks if tasks is not None else asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(file=out)
    return out.getvalue()
