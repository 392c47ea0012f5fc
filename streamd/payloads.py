"""The JSON payloads of the MQTT contract (pure): events and per-window analysis."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from streamd.domain import Event, EventType, Score, Window

PAYLOAD_VERSION = 1


def iso_utc(unix_s: float) -> str:
    """``2026-11-24T19:30:12.500Z`` (milliseconds, UTC)."""
    moment = datetime.fromtimestamp(unix_s, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_payload(
    event: Event, profile: str, model: str, files: bool | None = None
) -> dict[str, object]:
    """The self-contained event JSON of ``<prefix>/<stream>/events``.

    ``files``: None leaves out ``clip`` and ``snapshot`` (no store); True names the event's
    routes; False says there are none (null).
    """
    payload: dict[str, object] = {
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
    if files is not None:
        payload["clip"] = f"/api/events/{event.id}/clip.mp4" if files else None
        payload["snapshot"] = f"/api/events/{event.id}/snapshot.jpg" if files else None
    return payload


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


def event_from_payload(doc: dict[str, Any]) -> Event:
    """The ``Event`` an event JSON describes (a stored message being sent again)."""
    return Event(
        type=EventType(doc["type"]),
        id=doc["id"],
        stream=doc["stream"],
        seq=int(doc["seq"]),
        start_s=float(doc["start_pts_s"]),
        end_s=float(doc["end_pts_s"]),
        wall_start_s=parse_iso(doc["start"]),
        wall_end_s=parse_iso(doc["end"]),
        significance=int(doc["significance"]),
        peak_significance=int(doc["peak_significance"]),
        description=str(doc["description"]),
        windows=int(doc["windows"]),
        best_window=0,
        best_frame=0,
    )


def parse_iso(text: str) -> float:
    """Unix time of an ISO 8601 timestamp (``Z`` or an offset; naive means UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
