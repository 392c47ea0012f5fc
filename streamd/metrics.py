"""Every Prometheus instrument streamd has (served on ``/metrics`` by ``streamd.web``).

Only this module defines instruments, always on an injected ``CollectorRegistry`` (tests use a
fresh one). Label names are limited to ``stream``, ``reason``, ``type`` and ``stage``: never a
URL or a prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

MODEL_ERROR_REASONS = ("unreachable", "busy", "rejected", "refused", "timeout", "stalled", "error")
STAGES = ("decode", "queue", "vision", "prefill", "generate", "publish")
# Decode of one sampled frame is milliseconds; a window's analysis is seconds to a minute.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WINDOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


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
        # --- clips (streamd/store/clips.py) ---
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
        # --- storage (streamd/store/events.py) ---
        self.storage_errors = Counter(
            "streamd_storage_errors",
            "Event store failures (disk_full, corrupt, error); publishing goes on.",
            ("reason",),
            registry=r,
        )
        self.storage_deleted = Counter(
            "streamd_storage_deleted_events",
            "Events deleted with their files by retention (age, size, count).",
            ("reason",),
            registry=r,
        )
        self.storage_bytes = Gauge(
            "streamd_storage_bytes", "Event database, clips and snapshots on disk.", registry=r
        )
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
        for reason in ("disk_full", "corrupt", "error"):
            self.storage_errors.labels(reason=reason)
        for reason in ("age", "size", "count"):
            self.storage_deleted.labels(reason=reason)

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
