"""Where events go: the EventSink seam (MQTT, or the log when MQTT is off)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from streamd.domain import Event

logger = logging.getLogger(__name__)


class EventSink(Protocol):
    """Receives everything a pipeline publishes. The publishing methods never block: they queue.

    Delivery (and its retries, ordering and drop accounting) is the sink's business; a
    clustered broker or another transport plugs in here. The daemon runs ``run`` as a task,
    and at shutdown calls ``flush`` and then ``close``.
    """

    async def run(self) -> None:
        """The sink's own work (connections, retries) until cancelled; may return at once."""
        ...

    async def flush(self) -> None:
        """Wait until every accepted event was delivered (the caller bounds the wait)."""
        ...

    async def close(self) -> None:
        """Clean stop: every stream offline, then say goodbye, disconnect (caller bounds it).

        The sink itself marks every stream offline, whatever the pipelines reported last, so
        the daemon's shutdown order cannot leave a stream looking online.
        """
        ...

    def stream_status(self, stream: str, online: bool) -> None:
        """Is the stream's source delivering frames."""
        ...

    def event(self, event: Event, payload: bytes) -> None:
        """An event message (new/update/end); must not be lost while there is room."""
        ...

    def analysis(self, stream: str, payload: bytes) -> None:
        """One analysed window (best effort)."""
        ...

    def snapshot(self, stream: str, jpeg: bytes) -> None:
        """The picture of the latest event (latest value wins)."""
        ...


class LogSink:
    """``mqtt.enabled: false``: events go to the log, one line each."""

    def __init__(
        self,
        on_published: EventCounter | None = None,
        on_settled: Callable[[Event, bool], None] | None = None,
    ) -> None:
        self._on_published = on_published
        self._on_settled = on_settled

    async def run(self) -> None:
        """Nothing runs in the background."""

    async def flush(self) -> None:
        """Everything is logged at once."""

    async def close(self) -> None:
        """Nothing to close."""

    def stream_status(self, stream: str, online: bool) -> None:
        """Status changes are already logged by the source."""

    def event(self, event: Event, payload: bytes) -> None:
        """The pipeline logged the event already (one line each); the JSON goes to DEBUG."""
        logger.debug("event %s %s: %s", event.type.value, event.stream, payload.decode())
        if self._on_published is not None:
            self._on_published(event)
        if self._on_settled is not None:
            self._on_settled(event, True)

    def analysis(self, stream: str, payload: bytes) -> None:
        """Windows are logged by the pipeline already."""

    def snapshot(self, stream: str, jpeg: bytes) -> None:
        """No place for pictures in a log."""


class EventCounter(Protocol):
    """Called once an event message was delivered (for ``events_published_total``)."""

    def __call__(self, event: Event) -> None:
        """Count ``event``."""
        ...
