"""Shared fixtures: a real mosquitto, scripted clips, a GStreamer RTSP camera, an HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.broker import Mosquitto
from tests.daemon_proc import DaemonProcess
from tests.media import ClipSet
from tests.rtsp import RtspServer, rtsp_unavailable_reason
from tests.tiny_smolvlm import tiny_model_dir

__all__ = ["tiny_model_dir"]  # a session fixture, registered here

HTTP_SHUTDOWN_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """A plain, anonymous broker shared by the session. Tests that kill it must restart it."""
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic prefix no other test uses, e.g. `streamd-test/test_x/1a2b3c4d`."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", request.node.name)[:60]
    return f"streamd-test/{name}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> ClipSet:
    """The session's clips; each is encoded on first access (all of them take ~0.4 s)."""
    return ClipSet(tmp_path_factory.mktemp("clips"))


class RtspServerFactory(Protocol):
    def __call__(
        self, *, file: Path | str | None = None, live: bool = False, pattern: str = "ball"
    ) -> RtspServer: ...


def require_rtsp() -> None:
    """Skip without the GStreamer RTSP server, except under CI, where that is a failure."""
    reason = rtsp_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"RTSP server unavailable under CI: {reason}")
    pytest.skip(f"RTSP server unavailable: {reason}")


@pytest.fixture
def rtsp_server() -> Iterator[RtspServerFactory]:
    """Start RTSP cameras: `rtsp_server(file=clips.h264.path)` or `rtsp_server(live=True)`.

    Every server started here is stopped at teardown, even paused or after a failure.
    """
    require_rtsp()
    servers: list[RtspServer] = []

    def start(
        *, file: Path | str | None = None, live: bool = False, pattern: str = "ball"
    ) -> RtspServer:
        server = RtspServer(file=file, live=live, pattern=pattern)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in reversed(servers):
        server.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server() -> Iterator[Callable[[Path], str]]:
    """Serve a directory over HTTP on 127.0.0.1: `base = http_server(dir)` -> "http://...:PORT"."""
    running: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def serve(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http-server"
        )
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(HTTP_SHUTDOWN_TIMEOUT_S)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemon processes a test started: each closed (killed if still running) at its end."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.close()
