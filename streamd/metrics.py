"""Every Prometheus instrument streamd has, and the /metrics + /healthz HTTP endpoint.

Only this module defines instruments, always on an injected ``CollectorRegistry`` (tests use a
fresh one). Label names are limited to ``stream``, ``reason``, ``type`` and ``stage``: never a
URL or a prompt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from streamd.errors import StreamdError

logger = logging.getLogger(__name__)

MODEL_ERROR_REASONS = ("unreachable", "busy", "rejected", "refused", "timeout", "stalled", "error")
STAGES = ("decode", "queue", "vision", "prefill", "generate", "publish")
# Decode of one sampled frame is milliseconds; a window's analysis is seconds to a minute.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WINDOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

HealthCheck = Callable[[], tuple[bool, str]]


class Metrics:
    """All instruments, bound to one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        s = ("stream",)
        self.frames_decoded = Counter("streamd_frames_decoded", "Frames decoded.", s, registry=r)
        self.frames_sampled = Counter(
            "streamd_frames_sampled", "Frames kept by sampling, sent to windows.", s, registry=r
        )
        self.frames_dropped = Counter(
            "streamd_frames_dropped", "Sampled frames dropped.", (*s, "reason"), registry=r
        )
        self.decode_errors = Counter(
            "streamd_decode_errors", "Corrupt packets or frames skipped.", s, registry=r
        )
        self.reconnects = Counter("streamd_reconnects", "Source reconnections.", s, registry=r)
        self.windows = Counter("streamd_windows", "Windows cut from the buffer.", s, registry=r)
        self.windows_analyzed = Counter(
            "streamd_windows_analyzed", "Windows scored by the model.", s, registry=r
        )
        self.windows_dropped = Counter(
            "streamd_windows_dropped", "Windows not analysed.", (*s, "reason"), registry=r
        )
        self.unparsed_answers = Counter(
            "streamd_unparsed_answers", "Model answers without a readable score.", s, registry=r
        )
        self.events_published = Counter(
            "streamd_events_published", "Event messages published.", (*s, "type"), registry=r
        )
        self.mqtt_dropped = Counter(
            "streamd_mqtt_dropped", "MQTT messages dropped.", ("reason",), registry=r
        )
        self.vision_cache_hits = Counter(
            "streamd_vision_cache_hits", "Frames whose vision features were cached.", registry=r
        )
        self.vision_cache_misses = Counter(
            "streamd_vision_cache_misses", "Frames run through the vision encoder.", registry=r
        )
        self.vision_ahead = Counter(
            "streamd_vision_ahead_frames",
            "Frames offered for encoding before their window is cut: encoded, or dropped from"
            " the bounded queue (then encoded with their window).",
            ("outcome",),
            registry=r,
        )
        # --- clips (streamd/clips.py) ---
        self.clip_ring_bytes = Gauge(
            "streamd_clip_ring_bytes",
            "Demuxed packets held per stream for the pre-roll of the next clip.",
            s,
            registry=r,
        )
        self.clip_packets_dropped = Counter(
            "streamd_clip_packets_dropped",
            "Packets not kept for clips (queue full, ring over its byte bound, write error).",
            (*s, "reason"),
            registry=r,
        )
        self.clips = Counter("streamd_clips", "Event clips finished.", s, registry=r)
        self.clip_errors = Counter(
            "streamd_clip_errors", "Clips that could not be written.", (*s, "reason"), registry=r
        )
        # --- storage (streamd/store.py) ---
        self.stream_up = Gauge("streamd_stream_up", "1 while the source delivers.", s, registry=r)
        self.window_lag = Gauge(
            "streamd_window_lag_seconds",
            "Wall clock minus the end of the newest analysed window (live streams).",
            s,
            registry=r,
        )
        self.mqtt_connected = Gauge("streamd_mqtt_connected", "1 while connected.", registry=r)
        self.outbox_messages = Gauge(
            "streamd_outbox_messages", "Events waiting for the broker.", registry=r
        )
        self.model_ready = Gauge("streamd_model_ready", "1 once the model is warm.", registry=r)
        self.model_calls_in_flight = Gauge(
            "streamd_model_calls_in_flight",
            "Model calls running now (requests open, for a remote server).",
            registry=r,
        )
        self.model_call_seconds = Histogram(
            "streamd_model_call_seconds",
            "One model call (a request, for a remote server), start to answer.",
            buckets=WINDOW_BUCKETS,
            registry=r,
        )
        self.model_tokens = Counter(
            "streamd_model_tokens", "Tokens the model server counted.", ("type",), registry=r
        )
        self.model_errors = Counter(
            "streamd_model_errors", "Failed model calls.", ("reason",), registry=r
        )
        self.stage_seconds = Histogram(
            "streamd_stage_seconds",
            "Time per stage.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.window_seconds = Histogram(
            "streamd_window_seconds",
            "Whole analysis of one window, queue to score.",
            buckets=WINDOW_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for kind in ("prompt", "completion"):
            self.model_tokens.labels(type=kind)
        for reason in MODEL_ERROR_REASONS:
            self.model_errors.labels(reason=reason)

    def for_stream(self, stream: str) -> StreamMetrics:
        """Children bound to one stream's label (created now, so they show as 0)."""
        return StreamMetrics(
            frames_decoded=self.frames_decoded.labels(stream=stream),
            frames_sampled=self.frames_sampled.labels(stream=stream),
            frames_dropped_buffer=self.frames_dropped.labels(stream=stream, reason="buffer_full"),
            decode_errors=self.decode_errors.labels(stream=stream),
            reconnects=self.reconnects.labels(stream=stream),
            stream_up=self.stream_up.labels(stream=stream),
            windows=self.windows.labels(stream=stream),
            windows_analyzed=self.windows_analyzed.labels(stream=stream),
            unparsed_answers=self.unparsed_answers.labels(stream=stream),
            window_lag=self.window_lag.labels(stream=stream),
            decode_seconds=self.stage_seconds.labels(stage="decode"),
        )


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    """The per-stream children a source and its pipeline update."""

    frames_decoded: Counter
    frames_sampled: Counter
    frames_dropped_buffer: Counter
    decode_errors: Counter
    reconnects: Counter
    stream_up: Gauge
    windows: Counter
    windows_analyzed: Counter
    unparsed_answers: Counter
    window_lag: Gauge
    decode_seconds: Histogram


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a thread of their own.

    It keeps answering while the event loop is busy. ``health`` is called on the server thread
    for every ``/healthz``, so the answer is current; it must only read state, never change it
    (``Daemon.health`` reads attributes the loop replaces whole).
    """

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, health: HealthCheck):
        self.address = address
        self.registry = registry
        self.health = health
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; raises ``StreamdError`` with a clear message if the port is taken."""
        handler = _handler_class(self.registry, self.health)
        try:
            server = ThreadingHTTPServer(self.address, handler)
        except OSError as exc:
            host, port = self.address
            raise StreamdError(
                f"metrics.listen {host}:{port}: cannot listen: {exc.strerror or exc}"
                ' (another process has the port? change metrics.listen, or set it to "")'
            ) from exc
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="streamd.metrics", kwargs={"poll_interval": 0.2}
        )
        self._thread.daemon = True
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics", self.address[0], self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _handler_class(
    registry: CollectorRegistry, health: HealthCheck
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "streamd"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, reason = health()
                status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                body = (reason or "ok") + "\n"
                self._reply(status, body.encode(), "text/plain; charset=utf-8")
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"try /metrics or /healthz\n", "text/plain")

        def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Scrapes are not state changes: no access log."""

    return Handler
