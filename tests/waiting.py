"""Bounded polling for conditions that have no event to wait on (metrics, broker state)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

POLL_S = 0.02


async def eventually(
    condition: Callable[[], object], within_s: float = 5.0, what: str = ""
) -> None:
    """Return once ``condition()`` is truthy; fail the test after ``within_s`` seconds.

    ``condition`` may return an awaitable (an HTTP read in a thread): its result counts.
    """
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await _holds(condition):
            return
        await asyncio.sleep(POLL_S)
    if await _holds(condition):
        return
    raise AssertionError(f"not true after {within_s}s: {what or condition}")


def eventually_sync(condition: Callable[[], object], within_s: float = 5.0, what: str = "") -> None:
    """``eventually`` for plain (non-async) tests."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_S)
    if not condition():
        raise AssertionError(f"not true after {within_s}s: {what or condition}")


async def _holds(condition: Callable[[], object]) -> bool:
    result = condition()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)
