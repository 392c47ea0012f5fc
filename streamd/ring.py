"""Bounded hand-off from a producer thread (a decoder) to a consumer on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

PRODUCER_POLL_S = 0.25
"""How often a producer blocked on a full ring re-checks whether the ring was closed."""


class Overflow(enum.Enum):
    """What ``put`` does when the ring is full."""

    WAIT = "wait"  # files: backpressure reaches the decoder, nothing is lost
    DROP_OLDEST = "drop_oldest"  # live: keep the newest frames
    DROP_NEWEST = "drop_newest"


class RingClosed(Exception):
    """``get`` on a closed, drained ring."""


class FrameRing(Generic[T]):
    """A bounded deque shared by one producer thread and one event-loop consumer.

    The producer never touches the loop except through ``call_soon_threadsafe``, and only when
    the consumer is actually waiting, so a hand-off costs a lock round trip, not a loop wake-up.
    The consumer holds the lock only for a pop, never across an await.

    Items for which ``is_marker`` is true (end-of-stream, gap markers) bypass the capacity and
    are never dropped.

    ``wake_batch`` > 1 wakes the consumer only once that many items are waiting (or on a
    marker, on close, or when the producer is about to block): for files read as fast as
    possible, where latency does not matter and a loop wake-up per frame is measurable
    overhead (bench/ingest.py). Live and paced sources keep 1.
    """

    def __init__(
        self,
        maxsize: int,
        overflow: Overflow,
        loop: asyncio.AbstractEventLoop,
        on_drop: Callable[[], None] = lambda: None,
        is_marker: Callable[[T], bool] = lambda _item: False,
        wake_batch: int = 1,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        if not 1 <= wake_batch <= maxsize:
            raise ValueError("wake_batch must be between 1 and maxsize")
        self.wake_batch = wake_batch
        self.maxsize = maxsize
        self.overflow = overflow
        self._loop = loop
        self._on_drop = on_drop
        self._is_marker = is_marker
        self._items: deque[T] = deque()
        self._held = 0  # items that count against maxsize (markers do not)
        self._cond = threading.Condition(threading.Lock())
        self._event = asyncio.Event()
        self._consumer_waiting = False
        self._closed = False  # no more puts (producer finished, or consumer gone)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """Whether the ring takes no more items."""
        return self._closed

    # --- producer (any thread) -------------------------------------------------------------

    def put(self, item: T) -> bool:
        """Hand over ``item``; False if it was refused (ring closed, or dropped as newest).

        With ``Overflow.WAIT`` this blocks while the ring is full, until the consumer takes an
        item or closes the ring.
        """
        with self._cond:
            if self._closed:
                return False
            marker = self._is_marker(item)
            if not marker and self._held >= self.maxsize:
                if self.overflow is Overflow.WAIT:
                    if not self._wait_for_room():
                        return False
                elif self.overflow is Overflow.DROP_NEWEST:
                    self._count_drop()
                    return False
                else:
                    self._drop_oldest_frame()
            self._items.append(item)
            self._held += not marker
            if marker or self._held >= self.wake_batch:
                self._wake_consumer()
            return True

    def close(self) -> None:
        """Refuse further items; the consumer drains what is left, then gets ``RingClosed``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_consumer()

    # --- consumer (event loop) -------------------------------------------------------------

    async def get(self) -> T:
        """Next item, oldest first; raises ``RingClosed`` once closed and drained."""
        while True:
            with self._cond:
                if self._items:
                    return self._pop()
                if self._closed:
                    raise RingClosed
                self._consumer_waiting = True
                self._event.clear()
            await self._event.wait()

    def get_nowait(self) -> T | None:
        """Next item if one is ready (consumer side), else None."""
        with self._cond:
            return self._pop() if self._items else None

    # --- internals (lock held) -------------------------------------------------------------

    def _wait_for_room(self) -> bool:
        self._wake_consumer()  # a full ring must never wait on a consumer left asleep
        while not self._closed and self._held >= self.maxsize:
            self._cond.wait(PRODUCER_POLL_S)
        return not self._closed

    def _pop(self) -> T:
        item = self._items.popleft()
        self._held -= not self._is_marker(item)
        self._cond.notify()
        return item

    def _drop_oldest_frame(self) -> None:
        for index, held in enumerate(self._items):
            if not self._is_marker(held):
                del self._items[index]
                self._held -= 1
                self._count_drop()
                return

    def _count_drop(self) -> None:
        self.dropped += 1
        self._on_drop()

    def _wake_consumer(self) -> None:
        if self._consumer_waiting:
            self._consumer_waiting = False
            # RuntimeError: the loop is already closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._event.set)
