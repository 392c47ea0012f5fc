from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamd.errors import StreamdError
from streamd.metrics import Metrics, MetricsServer
from tests.scrape import get

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


def test_every_spec_instrument_scraped_over_http() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    cam = metrics.for_stream("frontdoor")
    cam.frames_decoded.inc(25)
    metrics.windows_dropped.labels(stream="frontdoor", reason="busy").inc()
    metrics.events_published.labels(stream="frontdoor", type="new").inc()
    metrics.mqtt_dropped.labels(reason="outbox_full").inc()
    with MetricsServer(("127.0.0.1", 0), registry, lambda: (True, "ok")) as server:
        status, body = get(f"http://127.0.0.1:{server.port}/metrics")
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


def test_healthz_reports_reason() -> None:
    registry = CollectorRegistry()
    state = {"health": (False, "streams down: frontdoor")}
    with MetricsServer(("127.0.0.1", 0), registry, lambda: state["health"]) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert get(f"{base}/healthz") == (503, "streams down: frontdoor\n")
        state["health"] = (True, "ok")
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/nope")[0] == 404


def test_port_taken_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = MetricsServer(("127.0.0.1", port), CollectorRegistry(), lambda: (True, "ok"))
        with pytest.raises(StreamdError, match=f"metrics.listen 127.0.0.1:{port}: cannot listen"):
            server.start()
