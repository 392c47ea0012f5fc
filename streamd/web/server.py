"""HttpServer: uvicorn serving the ASGI app on the daemon's event loop.

The socket is bound first, by us, so a taken port is one clear ``StreamdError`` (exit 3)
rather than uvicorn's own exit. uvicorn's signal capture is off: the daemon owns SIGINT and
SIGTERM and stops the server as part of its shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from streamd.errors import StreamdError

logger = logging.getLogger(__name__)
# uvicorn logs its own start and stop at INFO; we log the server's state ourselves.
_uvicorn_logger = logging.getLogger("uvicorn.error")
if _uvicorn_logger.level == logging.NOTSET:
    _uvicorn_logger.setLevel(logging.WARNING)

STOP_TIMEOUT_S = 3
"""Open connections (a clip being streamed) get this long to finish at shutdown."""
BACKLOG = 64


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The daemon handles signals; uvicorn must not replace its handlers."""
        yield


class HttpServer:
    """One listening socket, one uvicorn server task."""

    def __init__(self, address: tuple[str, int], app: ASGIApp) -> None:
        self.address = address
        self._app = app
        self._socket: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._socket is None:
            raise RuntimeError("not started")
        return int(self._socket.getsockname()[1])

    def bind(self) -> None:
        """Bind the socket; raises ``StreamdError`` naming the address if it cannot."""
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise StreamdError(
                f"http.listen {host}:{port}: cannot listen: {exc.strerror or exc}"
                ' (another process has the port? change http.listen, or set it to "")'
            ) from exc
        sock.setblocking(False)
        self._socket = sock

    async def start(self) -> None:
        """Bind (if not yet) and serve on the running loop."""
        if self._socket is None:
            self.bind()
        assert self._socket is not None  # noqa: S101 - bind() set it
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=STOP_TIMEOUT_S,
            server_header=False,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._socket]), name="streamd.http"
        )
        host, _ = self.address
        shown = f"[{host}]" if ":" in host else host
        logger.info("http on http://%s:%d/ (review page, /api, /metrics)", shown, self.port)

    async def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S + 1):
                    await self._task
            except TimeoutError:
                if self._server is not None:
                    self._server.force_exit = True
                self._task.cancel()
            self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
