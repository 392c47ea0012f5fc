"""The JSON payloads of the MQTT contract (pure): events and per-window analysis."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from streamd.domain import Event, Score, Window

PAYLOAD_VERSION = 1


def iso_utc(unix_s: float) -> str:
    """``2026-11-24T19:30:12.500Z`` (milliseconds, UTC)."""
    moment = datetime.fromtimestamp(unix_s, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_payload(event: Event, profile: str, model: str) -> dict[str, object]:
    """The self-contained event JSON of ``<prefix>/<stream>/events``."""
    return {
        "v": PAYLOAD_VERSION,
        "type": event.type.value,
        "id": event.id,
        "stream": event.stream,
        "seq": event.seq,
        "start": iso_utc(event.wall_start_s),
        "end": iso_utc(event.wall_end_s),
        "start_pts_s": round(event.start_s, 3),
        "end_pts_s": round(event.end_s, 3),
        "significance": event.significance,
        "peak_significance": event.peak_significance,
        "description": event.description,
        "profile": profile,
        "model": model,
        "windows": event.windows,
    }


def analysis_payload(window: Window, score: Score, latency_s: float) -> dict[str, object]:
    """Every analysed window, on ``<prefix>/<stream>/analysis``."""
    return {
        "v": PAYLOAD_VERSION,
        "stream": window.stream,
        "seq": window.seq,
        "start": iso_utc(window.wall_start_s),
        "end": iso_utc(window.wall_end_s),
        "significance": score.significance,
        "description": score.description,
        "latency_s": round(latency_s, 3),
    }


def encode(payload: dict[str, object]) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
