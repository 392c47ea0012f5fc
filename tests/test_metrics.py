from __future__ import annotations

import asyncio
import gzip
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamd.errors import StreamdError
from streamd.metrics import Metrics
from tests.scrape import get
from tests.web import FakeReview, serving

SPEC_METRICS = {
    "streamd_frames_decoded": "counter",
    "streamd_frames_sampled": "counter",
    "streamd_frames_dropped": "counter",
    "streamd_decode_errors": "counter",
    "streamd_reconnects": "counter",
    "streamd_windows": "counter",
    "streamd_windows_analyzed": "counter",
    "streamd_windows_dropped": "counter",
    "streamd_unparsed_answers": "counter",
    "streamd_events_published": "counter",
    "streamd_mqtt_dropped": "counter",
    "streamd_vision_cache_hits": "counter",
    "streamd_vision_cache_misses": "counter",
    "streamd_stream_up": "gauge",
    "streamd_window_lag_seconds": "gauge",
    "streamd_mqtt_connected": "gauge",
    "streamd_outbox_messages": "gauge",
    "streamd_model_ready": "gauge",
    "streamd_stage_seconds": "histogram",
    "streamd_window_seconds": "histogram",
}
ALLOWED_LABELS = {"stream", "reason", "type", "stage", "le"}


async def test_every_spec_instrument_scraped_over_http() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    cam = metrics.for_stream("frontdoor")
    cam.frames_decoded.inc(25)
    metrics.windows_dropped.labels(stream="frontdoor", reason="busy").inc()
    metrics.events_published.labels(stream="frontdoor", type="new").inc()
    metrics.mqtt_dropped.labels(reason="outbox_full").inc()
    async with serving(FakeReview(), registry) as base:
        status, body = await asyncio.to_thread(get, f"{base}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name, kind in SPEC_METRICS.items():
        assert name in families, name
        assert families[name].type == kind, name
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
    assert 'streamd_frames_decoded_total{stream="frontdoor"} 25.0' in body
    stages = {s.labels["stage"] for s in families["streamd_stage_seconds"].samples}
    assert stages == {"decode", "queue", "vision", "prefill", "generate", "publish"}


async def test_openmetrics_and_gzip_are_negotiated() -> None:
    """prometheus_client's own ASGI app: OpenMetrics when asked, gzip when accepted."""
    registry = CollectorRegistry()
    Metrics(registry).for_stream("frontdoor").frames_decoded.inc(3)
    async with serving(FakeReview(), registry) as base:

        def fetch(headers: dict[str, str]) -> tuple[str, str, bytes]:
            request = urllib.request.Request(f"{base}/metrics", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                return (
                    response.headers.get("Content-Type", ""),
                    response.headers.get("Content-Encoding", ""),
                    response.read(),
                )

        kind, encoding, body = await asyncio.to_thread(
            fetch, {"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert kind.startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        kind, encoding, body = await asyncio.to_thread(fetch, {"Accept-Encoding": "gzip"})
        assert encoding == "gzip"
        assert b'streamd_frames_decoded_total{stream="frontdoor"} 3.0' in gzip.decompress(body)


async def test_healthz_reports_reason() -> None:
    review = FakeReview(health=(False, "streams down: frontdoor"))
    async with serving(review, CollectorRegistry()) as base:
        assert await asyncio.to_thread(get, f"{base}/healthz") == (
            503,
            "streams down: frontdoor\n",
        )
        review.health_state = (True, "ok")
        assert await asyncio.to_thread(get, f"{base}/healthz") == (200, "ok\n")
        assert (await asyncio.to_thread(get, f"{base}/nope"))[0] == 404


async def test_port_taken_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StreamdError, match=f"http.listen 127.0.0.1:{port}: cannot listen"):
            async with serving(FakeReview(), CollectorRegistry(), port=port):
                pass
