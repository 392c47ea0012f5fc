"""Offline ``analyze``: the live path's windows and scoring over a file, merged and ranked."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import av
import av.error
from prometheus_client import CollectorRegistry

from streamd.config import ModelConfig, Profile, StreamConfig
from streamd.domain import ScoreRequest, Window
from streamd.errors import SourceError
from streamd.ingest import PyAVSource
from streamd.metrics import Metrics
from streamd.pipeline import frame_ring, windows_from
from streamd.scoring import create_backend
from streamd.scoring.prompt import resolve_prompt
from streamd.scoring.runner import ModelRunner
from streamd.window import Windower

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 15.0
RING_FRAMES = 8
ANALYZE_STREAM = "analyze"
HOUR_S = 3600


@dataclass(frozen=True, slots=True)
class AnalyzeOptions:
    """What ``streamd analyze`` was asked to do."""

    video: str
    model: ModelConfig
    profile: Profile = "highlights"
    system_prompt: str | None = None
    prompt: str | None = None
    window_s: float = 30.0
    overlap_s: float = 5.0
    sample_fps: float = 1.0
    min_significance: int = 6
    max_highlights: int = 10


@dataclass(frozen=True, slots=True)
class ScoredSpan:
    """One analysed window, reduced to what ranking needs."""

    start_s: float
    end_s: float
    significance: int | None
    description: str


@dataclass(frozen=True, slots=True)
class Highlight:
    """A merged, ranked moment."""

    start_s: float
    end_s: float
    significance: int
    description: str

    def to_json(self) -> dict[str, object]:
        """The spec's highlight object."""
        return {
            "timestamp": format_span(self.start_s, self.end_s),
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "description": self.description,
            "significance": self.significance,
        }


# --- pure: merging, ranking, formatting -------------------------------------------------------


def merge_highlights(
    spans: Sequence[ScoredSpan], min_significance: int, max_highlights: int
) -> list[Highlight]:
    """Windows at or above ``min_significance``, overlapping runs merged, best first.

    Overlapping significant windows show the same moment, so they become one highlight
    spanning all of them, with the best window's score and description (the earliest on a
    tie). Ranked by significance, highest first, ties by time; at most ``max_highlights``.
    """
    keep = sorted(
        (s for s in spans if s.significance is not None and s.significance >= min_significance),
        key=lambda s: (s.start_s, s.end_s),
    )
    merged: list[Highlight] = []
    for span in keep:
        assert span.significance is not None  # noqa: S101 - filtered above
        last = merged[-1] if merged else None
        if last is not None and span.start_s < last.end_s:
            better = span.significance > last.significance
            merged[-1] = Highlight(
                start_s=last.start_s,
                end_s=max(last.end_s, span.end_s),
                significance=span.significance if better else last.significance,
                description=span.description if better else last.description,
            )
        else:
            merged.append(Highlight(span.start_s, span.end_s, span.significance, span.description))
    merged.sort(key=lambda h: (-h.significance, h.start_s))
    return merged[:max_highlights]


def format_clock(seconds: float, with_hours: bool) -> str:
    """``M:SS``, or ``H:MM:SS`` when ``with_hours``."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if with_hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def format_span(start_s: float, end_s: float) -> str:
    """``M:SS-M:SS``, or ``H:MM:SS-H:MM:SS`` once the span reaches an hour."""
    with_hours = end_s >= HOUR_S
    return f"{format_clock(start_s, with_hours)}-{format_clock(end_s, with_hours)}"


def expected_windows(duration_s: float, window_s: float, stride_s: float) -> int:
    """How many windows a video of ``duration_s`` gives (for the progress bar)."""
    if duration_s <= window_s:
        return 1
    return math.ceil((duration_s - window_s) / stride_s) + 1


def result_json(
    options: AnalyzeOptions,
    duration_s: float,
    model_id: str,
    windows: int,
    highlights: Sequence[Highlight],
) -> dict[str, object]:
    """The spec's result object."""
    return {
        "video": options.video,
        "duration_s": round(duration_s, 3),
        "model": model_id,
        "profile": options.profile,
        "windows": windows,
        "highlights": [h.to_json() for h in highlights],
    }


# --- I/O: probing, progress, the analysis run -------------------------------------------------


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What a quick look at a file says."""

    duration_s: float
    width: int
    height: int
    has_audio: bool


def probe(path: str) -> VideoInfo:
    """Open the file just enough to know it is a video; ``SourceError`` in one line if not."""
    if not Path(path).is_file():
        raise SourceError(f"{path}: no such file")
    try:
        with av.open(path, timeout=(PROBE_TIMEOUT_S, PROBE_TIMEOUT_S)) as container:
            if not container.streams.video:
                raise SourceError(f"{path}: no video stream")
            stream = container.streams.video[0]
            duration = _duration_s(container, stream)
            return VideoInfo(duration, stream.width, stream.height, bool(container.streams.audio))
    except (av.error.FFmpegError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise SourceError(f"{path}: not a readable video ({reason})") from exc


def _duration_s(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float:
    if container.duration is not None:
        return float(container.duration) / av.time_base
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    rate = stream.average_rate
    return float(stream.frames / rate) if stream.frames and rate else 0.0


class ProgressBar:
    """``[#####-----] 12/216 windows  0:42 left`` on a terminal; a line every 10% otherwise."""

    def __init__(
        self, total: int, out: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic
    ):
        self.total = max(1, total)
        self.done = 0
        self._out = out
        self._clock = clock
        self._started = clock()
        self._tty = out.isatty()
        self._last_decile = -1

    def advance(self) -> None:
        """One more window done."""
        self.done += 1
        shown = min(self.done, self.total)
        elapsed = self._clock() - self._started
        left = elapsed / self.done * max(0, self.total - self.done)
        eta = format_clock(left, left >= HOUR_S)
        if self._tty:
            filled = round(30 * shown / self.total)
            bar = "#" * filled + "-" * (30 - filled)
            self._out.write(f"\r[{bar}] {shown}/{self.total} windows  {eta} left ")
            self._out.flush()
            return
        decile = 10 * shown // self.total
        if decile != self._last_decile:
            self._last_decile = decile
            self._out.write(f"{shown}/{self.total} windows, {eta} left\n")
            self._out.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._tty:
            self._out.write("\n")
            self._out.flush()


async def analyze(
    options: AnalyzeOptions, info: VideoInfo, out: TextIO = sys.stderr
) -> tuple[str, list[ScoredSpan]]:
    """Score every window of the file; returns the model id and the scored spans in time order.

    Raises ``ModelError`` if the model cannot be loaded, ``SourceError`` if the file breaks.
    """
    stride = options.window_s - options.overlap_s
    stream = StreamConfig(
        name=ANALYZE_STREAM,
        url=options.video,
        live=False,
        sample_fps=options.sample_fps,
        window_s=options.window_s,
        stride_s=stride,
        profile=options.profile,
        min_significance=options.min_significance,
    )
    metrics = Metrics(CollectorRegistry())
    backend = create_backend(options.model)
    prompt = resolve_prompt(options.profile, options.system_prompt, options.prompt)
    spans: list[ScoredSpan] = []
    async with ModelRunner(backend, metrics, options.model.timeout_s) as runner:
        scheduler = asyncio.create_task(runner.run(), name="streamd.model")
        loop = asyncio.get_running_loop()
        stream_metrics = metrics.for_stream(ANALYZE_STREAM)
        ring = frame_ring(stream, loop, stream_metrics)
        source = PyAVSource(stream, backend.input_size, ring, stream_metrics)
        progress = ProgressBar(expected_windows(info.duration_s, options.window_s, stride), out)
        source.start()
        try:
            windower = Windower(ANALYZE_STREAM, options.window_s, stride)
            async for window in windows_from(ring, windower):
                score = await runner.score(ScoreRequest(window, prompt, options.min_significance))
                spans.append(_span(window, score.significance, score.description, info.duration_s))
                progress.advance()
        finally:
            progress.close()
            source.stop()
            scheduler.cancel()
        if not spans and info.duration_s > 0:
            raise SourceError(f"{options.video}: no frame could be decoded")
    return backend.model_id, spans


def _span(
    window: Window, significance: int | None, description: str, duration_s: float
) -> ScoredSpan:
    end = min(window.end_s, duration_s) if duration_s > 0 else window.end_s
    return ScoredSpan(window.start_s, max(end, window.start_s), significance, description)
