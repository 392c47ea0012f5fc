"""The real HTTP server on a free port, for API tests, with a stand-in for the daemon's state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from streamd.daemon import latest_jpeg
from streamd.domain import Frame
from streamd.store.events import EventStore
from streamd.web.api import StreamView, create_app
from streamd.web.server import HttpServer


@dataclass
class View:
    """One stream as the API sees it."""

    name: str
    live: bool = True
    healthy: bool = True
    latest_frame: Frame | None = None
    windows: list[tuple[float, float, int | None]] = field(default_factory=list)

    def recent_windows(self) -> list[tuple[float, float, int | None]]:
        """The strip's windows."""
        return list(self.windows)


class FakeReview:
    """The daemon's side of the API: a real store (or none), streams and health set by tests."""

    def __init__(
        self,
        store: EventStore | None = None,
        views: Sequence[StreamView] = (),
        health: tuple[bool, str] = (True, "ok"),
    ) -> None:
        self.store = store
        self.views = list(views)
        self.health_state = health

    def health(self) -> tuple[bool, str]:
        """What /healthz answers."""
        return self.health_state


@contextlib.asynccontextmanager
async def serving(
    review: FakeReview,
    registry: CollectorRegistry,
    token: str | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
) -> AsyncIterator[str]:
    """Serve ``review`` on the running loop; yields the base URL."""
    server = HttpServer((host, port), create_app(review, registry, token, latest_jpeg))
    await server.start()
    try:
        yield f"http://{host}:{server.port}"
    finally:
        await server.stop()
