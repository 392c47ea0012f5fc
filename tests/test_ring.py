from __future__ import annotations

import asyncio
import threading

import pytest

from streamd.mailbox import Mailbox, MailboxClosed
from streamd.ring import FrameRing, Overflow, RingClosed
from tests.waiting import eventually


async def drain(ring: FrameRing[int]) -> list[int]:
    out = []
    async with asyncio.timeout(5):
        while True:
            try:
                out.append(await ring.get())
            except RingClosed:
                return out


def produce(ring: FrameRing[int], items: list[int]) -> threading.Thread:
    def run() -> None:
        for item in items:
            ring.put(item)
        ring.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def test_wait_policy_loses_nothing_and_applies_backpressure() -> None:
    ring: FrameRing[int] = FrameRing(2, Overflow.WAIT, asyncio.get_running_loop())
    thread = produce(ring, list(range(500)))
    await eventually(lambda: len(ring) == 2, what="the producer filled the ring")
    assert thread.is_alive()  # blocked on the full ring: it waits, it does not drop
    assert len(ring) == 2
    assert ring.dropped == 0
    assert await drain(ring) == list(range(500))
    thread.join(5)
    assert ring.dropped == 0


async def test_drop_oldest_counts_drops() -> None:
    dropped: list[int] = []
    ring: FrameRing[int] = FrameRing(
        3, Overflow.DROP_OLDEST, asyncio.get_running_loop(), on_drop=lambda: dropped.append(1)
    )
    for i in range(10):
        assert ring.put(i)
    ring.close()
    assert await drain(ring) == [7, 8, 9]
    assert ring.dropped == len(dropped) == 7


async def test_drop_newest() -> None:
    ring: FrameRing[int] = FrameRing(2, Overflow.DROP_NEWEST, asyncio.get_running_loop())
    assert [ring.put(i) for i in range(4)] == [True, True, False, False]
    ring.close()
    assert await drain(ring) == [0, 1]


async def test_markers_bypass_capacity_and_are_never_dropped() -> None:
    ring: FrameRing[int] = FrameRing(
        2, Overflow.DROP_OLDEST, asyncio.get_running_loop(), is_marker=lambda x: x < 0
    )
    for item in (1, -1, 2, 3, 4, -2, 5):
        ring.put(item)
    ring.close()
    assert await drain(ring) == [-1, 4, -2, 5]  # order kept, only frames dropped


async def test_close_unblocks_a_waiting_producer() -> None:
    ring: FrameRing[int] = FrameRing(1, Overflow.WAIT, asyncio.get_running_loop())
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.extend(ring.put(i) for i in range(3)))
    thread.start()
    await eventually(lambda: len(ring) == 1, what="the first item is in")
    assert thread.is_alive()  # blocked on the second put
    ring.close()
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()
    assert results == [True, False, False]


async def test_consumer_wakes_for_items_from_a_thread() -> None:
    ring: FrameRing[int] = FrameRing(4, Overflow.WAIT, asyncio.get_running_loop())
    getter = asyncio.create_task(ring.get())
    await asyncio.sleep(0)
    threading.Thread(target=ring.put, args=(42,)).start()
    async with asyncio.timeout(5):
        assert await getter == 42


async def test_mailbox_replace_keeps_newest() -> None:
    replaced: list[str] = []
    box: Mailbox[str] = Mailbox(replace=True, on_replace=replaced.append)
    for item in ("a", "b", "c"):
        await box.put(item)
    assert replaced == ["a", "b"]
    assert await box.get() == "c"
    box.close()
    with pytest.raises(MailboxClosed):
        await box.get()


async def test_mailbox_wait_blocks_until_taken() -> None:
    box: Mailbox[int] = Mailbox(replace=False)
    await box.put(1)
    second = asyncio.create_task(box.put(2))
    for _ in range(10):  # let it run until it waits: a put on a full slot never completes
        await asyncio.sleep(0)
    assert not second.done()
    async with asyncio.timeout(5):
        assert await box.get() == 1
        await second
        assert await box.get() == 2


async def test_mailbox_close_drains_then_raises() -> None:
    box: Mailbox[int] = Mailbox(replace=False)
    await box.put(1)
    assert box.close() == 1
    with pytest.raises(MailboxClosed):
        await box.put(2)
    assert await box.get() == 1
    with pytest.raises(MailboxClosed):
        await box.get()


async def test_mailbox_take_pending() -> None:
    box: Mailbox[int] = Mailbox(replace=True)
    await box.put(7)
    assert box.take_pending() == 7
    assert box.take_pending() is None


async def test_wake_batch_wakes_the_consumer_per_batch_marker_or_full() -> None:
    ring: FrameRing[int] = FrameRing(
        6, Overflow.WAIT, asyncio.get_running_loop(), is_marker=lambda x: x < 0, wake_batch=4
    )
    getter = asyncio.create_task(ring.get())
    await asyncio.sleep(0)  # the consumer now waits
    for item in (1, 2, 3):
        ring.put(item)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not getter.done()  # three frames: no wake-up yet
    ring.put(4)
    async with asyncio.timeout(5):
        assert await getter == 1
    assert [ring.get_nowait() for _ in range(3)] == [2, 3, 4]
    marker_getter = asyncio.create_task(ring.get())
    await asyncio.sleep(0)
    ring.put(-1)  # a marker wakes at once
    async with asyncio.timeout(5):
        assert await marker_getter == -1


def test_wake_batch_must_fit_the_ring() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="wake_batch"):
            FrameRing(2, Overflow.WAIT, loop, wake_batch=3)
    finally:
        loop.close()
