"""StoredSink: the event store in front of a delivering sink (MQTT, or the log).

Every event message is written to the store first and handed to the delivering sink only once
written, in order (the store's one thread runs the writes FIFO and each hands over through
``call_soon_threadsafe``, also FIFO). The delivering sink reports each message it settles
(acknowledged, or dropped and counted) and the store's outbox row goes. At start the rows left
unsettled by an earlier run, and the ``end`` of every event a crash left open, are handed over
before anything new: held events survive a restart or a ``kill -9`` and go out in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from streamd.domain import Event
from streamd.payloads import event_from_payload
from streamd.sinks import EventSink
from streamd.store.events import EventStore

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 60.0
SettleHook = Callable[[Event, bool], None]
"""Called by the delivering sink for each event message that leaves it: (event, delivered)."""


class StoredSink:
    """An ``EventSink``: store, then deliver through ``inner``.

    Args:
        store: The opened event store.
        make_inner: Builds the delivering sink, given the hook it calls as messages settle.
    """

    def __init__(self, store: EventStore, make_inner: Callable[[SettleHook], EventSink]) -> None:
        self._store = store
        self.inner = make_inner(self._settled)
        self._loop = asyncio.get_running_loop()
        self._writing = 0
        self._written = asyncio.Event()
        self._written.set()

    async def start(self) -> dict[str, int]:
        """End events a crash left open, queue the unsent messages; returns each stream's seq."""
        store = self._store
        await store.call(store.end_interrupted)
        unsent = await store.call(store.unsent)
        for message in unsent:
            try:
                event = event_from_payload(json.loads(message.payload))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("storage: skipping an unreadable stored message: %s", exc)
                await store.call(store.settle, [(message.stream, message.seq)])
                continue
            self.inner.event(event, message.payload)
        if unsent:
            logger.info("storage: %d event message(s) from an earlier run to send", len(unsent))
        return await store.call(store.last_seqs)

    async def run(self) -> None:
        """The delivering sink's work, and retention every ``RETENTION_INTERVAL_S``."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.inner.run(), name="streamd.sink.deliver")
            tasks.create_task(self._retention(), name="streamd.sink.retention")

    async def _retention(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await self._store.call(self._store.retention)
            await asyncio.sleep(RETENTION_INTERVAL_S)

    async def flush(self) -> None:
        """Wait for the writes under way, then for the delivering sink."""
        await self._written.wait()
        await self.inner.flush()

    async def close(self) -> None:
        """Close the delivering sink (the daemon closes the store after)."""
        await self.inner.close()

    def stream_status(self, stream: str, online: bool) -> None:
        """Not stored: handed on."""
        self.inner.stream_status(stream, online)

    def event(self, event: Event, payload: bytes) -> None:
        """Store, then hand on (also when the write failed: publishing never waits on disk)."""
        try:
            future = self._store.submit(self._store.record, payload)
        except RuntimeError:  # the store is closed (shutdown): deliver unstored
            self.inner.event(event, payload)
            return
        self._writing += 1
        self._written.clear()
        future.add_done_callback(
            lambda _done: self._loop.call_soon_threadsafe(self._hand_on, event, payload)
        )

    def _hand_on(self, event: Event, payload: bytes) -> None:
        self._writing -= 1
        if self._writing == 0:
            self._written.set()
        self.inner.event(event, payload)

    def analysis(self, stream: str, payload: bytes) -> None:
        """Not stored: handed on."""
        self.inner.analysis(stream, payload)

    def snapshot(self, stream: str, jpeg: bytes) -> None:
        """The retained MQTT snapshot: handed on (event snapshots are stored by the pipeline)."""
        self.inner.snapshot(stream, jpeg)

    def _settled(self, event: Event, delivered: bool) -> None:
        """The delivering sink is done with a message: its outbox row goes."""
        with contextlib.suppress(RuntimeError):  # the store is closed: the row stays, resent
            self._store.submit(self._store.settle, [(event.stream, event.seq)])
