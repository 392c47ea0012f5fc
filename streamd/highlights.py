"""Offline ``analyze``: the live path's windows and scoring over a file, merged and ranked."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import av
import av.error
from prometheus_client import CollectorRegistry

from streamd.config import ModelSection, StreamConfig
from streamd.domain import Score, ScoreRequest, Window
from streamd.errors import SourceError
from streamd.ingest import PyAVSource
from streamd.log import printable
from streamd.metrics import Metrics
from streamd.pipeline import frame_ring, windows_from
from streamd.scoring import create_backend
from streamd.scoring.prompt import resolve_prompt
from streamd.scoring.runner import ModelRunner
from streamd.timefmt import HOUR_S, format_clock
from streamd.window import Windower

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 15.0
SCHEDULER_STOP_TIMEOUT_S = 5.0
JOIN_SLACK_S = 2.0
"""The decode thread is given its read timeout plus this to stop."""


@dataclass(frozen=True, slots=True)
class AnalyzeOptions:
    """What ``streamd analyze`` was asked to do: the stream and model configs, built once."""

    video: str
    model: ModelSection
    stream: StreamConfig
    max_highlights: int = 10

    @property
    def overlap_s(self) -> float:
        """How much consecutive windows overlap."""
        return self.stream.window_s - self.stream.stride_s


@dataclass(frozen=True, slots=True)
class ScoredSpan:
    """One analysed window, reduced to what ranking needs.

    ``best_s`` is the time of the frame the backend says best shows the window (None: unknown).
    """

    start_s: float
    end_s: float
    significance: int | None
    description: str
    best_s: float | None = None


@dataclass(frozen=True, slots=True)
class Highlight:
    """A merged, ranked moment; ``best_s`` is its best window's best frame time, if known."""

    start_s: float
    end_s: float
    significance: int
    description: str
    best_s: float | None = None

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
                best_s=span.best_s if better else last.best_s,
            )
        else:
            merged.append(
                Highlight(
                    span.start_s, span.end_s, span.significance, span.description, span.best_s
                )
            )
    merged.sort(key=lambda h: (-h.significance, h.start_s))
    return merged[:max_highlights]


def format_span(start_s: float, end_s: float) -> str:
    """``M:SS-M:SS``, or ``H:MM:SS-H:MM:SS`` once the span reaches an hour."""
    with_hours = end_s >= HOUR_S
    return f"{format_clock(start_s, with_hours)}-{format_clock(end_s, with_hours)}"


def expected_windows(duration_s: float, window_s: float, stride_s: float) -> int:
    """How many windows a video of ``duration_s`` gives (for the progress bar)."""
    if duration_s <= window_s:
        return 1
    return math.ceil((duration_s - window_s) / stride_s) + 1


@dataclass(slots=True)
class Analysis:
    """What a run has scored so far. The caller owns it, so an interrupted run keeps its part.

    Attributes:
        model_id: The backend's model id (the configured one until the backend is created).
        spans: Every scored window, in time order.
        complete: True once the whole file was read and scored.
    """

    model_id: str
    spans: list[ScoredSpan] = field(default_factory=list)
    complete: bool = False

    @property
    def analyzed_s(self) -> tuple[float, float] | None:
        """The stretch of the video the scored windows cover, or None before the first."""
        if not self.spans:
            return None
        return self.spans[0].start_s, max(span.end_s for span in self.spans)


def result_json(
    options: AnalyzeOptions,
    duration_s: float,
    analysis: Analysis,
    highlights: Sequence[Highlight],
) -> dict[str, object]:
    """The spec's result object, plus ``complete`` and ``analyzed_s`` ([start, end] seconds)."""
    span = analysis.analyzed_s
    return {
        "video": options.video,
        "duration_s": round(duration_s, 3),
        "model": analysis.model_id,
        "profile": options.stream.profile,
        "windows": len(analysis.spans),
        "complete": analysis.complete,
        "analyzed_s": None if span is None else [round(span[0], 3), round(span[1], 3)],
        "highlights": [h.to_json() for h in highlights],
    }


def ended_early(duration_s: float, analysis: Analysis, sample_fps: float) -> float | None:
    """Where a complete run's video ended, when that is well before its stated duration.

    A truncated file whose index is at the front still states the full duration; the frames
    simply stop. "Well before" is more than a sample period and a second (or 1%) of slack,
    since the last window ends one sample period after its last frame.
    """
    span = analysis.analyzed_s
    if not analysis.complete or span is None or duration_s <= 0:
        return None
    slack = max(1.0, 2.0 / sample_fps, 0.01 * duration_s)
    return span[1] if span[1] < duration_s - slack else None


# --- I/O: probing, progress, the analysis run -------------------------------------------------


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What a quick look at a file says."""

    duration_s: float
    width: int
    height: int


def probe(path: str) -> VideoInfo:
    """Open the file just enough to know it is a video; ``SourceError`` in one line if not."""
    if not Path(path).is_file():
        raise SourceError(f"{path}: no such file")
    try:
        with av.open(path, timeout=(PROBE_TIMEOUT_S, PROBE_TIMEOUT_S)) as container:
            if not container.streams.video:
                raise SourceError(f"{path}: no video stream")
            stream = container.streams.video[0]
            return VideoInfo(_duration_s(container, stream), stream.width, stream.height)
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
        eta = format_clock(left)
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
    options: AnalyzeOptions, info: VideoInfo, analysis: Analysis, out: TextIO = sys.stderr
) -> None:
    """Score every window of the file into ``analysis`` (in time order), then mark it complete.

    Cancelling it (Ctrl-C) stops the decode thread and the model, and leaves ``analysis``
    holding what was scored. Raises ``ModelError`` if the model cannot be loaded,
    ``SourceError`` if no frame of the file can be decoded.
    """
    metrics = Metrics(CollectorRegistry())
    backend = create_backend(options.model)
    analysis.model_id = backend.model_id
    # No stall guard: a file is not live, and a slow window (a 2.2B model on a CPU) is still
    # progress. A model server's requests keep their own timeout (model.timeout_s). No warm-up:
    # nobody waits for the first window's latency, and a throwaway window costs seconds of CPU
    # (bench/offline.py).
    async with ModelRunner(
        backend, metrics, None, one_stream_batches=True, warm_up=False
    ) as runner:
        scheduler = asyncio.create_task(runner.run(), name="streamd.model")
        try:
            await _score_file(options, info, analysis, runner, backend.input_size, metrics, out)
        finally:
            scheduler.cancel()
            # Bounded: the scheduler only awaits its own queue, so it ends at once.
            await asyncio.wait({scheduler}, timeout=SCHEDULER_STOP_TIMEOUT_S)
    if not analysis.spans and info.duration_s > 0:
        raise SourceError(f"{options.video}: no frame could be decoded")
    analysis.complete = True
    end_s = ended_early(info.duration_s, analysis, options.stream.sample_fps)
    if end_s is not None:
        logger.warning(
            "%s: video ended at %s of %s (truncated?); the result covers only that",
            options.video,
            format_clock(end_s),
            format_clock(info.duration_s),
        )


async def _score_file(
    options: AnalyzeOptions,
    info: VideoInfo,
    analysis: Analysis,
    runner: ModelRunner,
    input_size: tuple[int, int],
    metrics: Metrics,
    out: TextIO,
) -> None:
    """Decode the file on its own thread and score its windows as they are cut."""
    stream = options.stream
    stream_metrics = metrics.for_stream(stream.name)
    ring = frame_ring(stream, asyncio.get_running_loop(), stream_metrics)
    source = PyAVSource(stream, input_size, ring, stream_metrics)
    prompt = resolve_prompt(stream.profile, stream.system_prompt, stream.prompt)
    windower = Windower(stream.name, stream.window_s, stream.stride_s)
    total = expected_windows(info.duration_s, stream.window_s, stream.stride_s)
    progress = ProgressBar(total, out)
    windows = windows_from(ring, windower)
    # Keep as many windows open as the model takes at once, and record them in time order: a
    # model server's max_in_flight requests, or an in-process model's batch of consecutive
    # windows (one call: one vision batch, one prefill, one decode for all of them). A batch is
    # handed over whole, so the runner sees it at once; the next one is cut meanwhile.
    backend = runner.backend
    batch = max(1, backend.max_batch)
    limit = max(1, backend.max_in_flight) * batch * (2 if batch > 1 else 1)
    in_flight: deque[tuple[Window, asyncio.Task[Score]]] = deque()
    group: list[Window] = []

    async def record_oldest() -> None:
        window, task = in_flight.popleft()
        score = await task
        span = _span(window, score, info.duration_s)
        analysis.spans.append(span)
        logger.debug(
            "window %s: %s %s",
            format_span(span.start_s, span.end_s),
            span.significance,
            printable(span.description),
        )
        progress.advance()

    # Only a window that can become a highlight needs its description (--describe-all: all).
    describe_below = None if stream.describe_below_min is True else stream.min_significance

    def hand_over() -> None:
        for window in group:
            request = ScoreRequest(window, prompt, describe_below)
            in_flight.append((window, asyncio.create_task(runner.score(request))))
        group.clear()

    source.start()
    try:
        async for window in windows:
            group.append(window)
            if len(group) >= batch:
                hand_over()
            while len(in_flight) >= limit:
                await record_oldest()
        hand_over()
        while in_flight:
            await record_oldest()
    finally:
        for _, task in in_flight:
            task.cancel()
        await asyncio.gather(*(task for _, task in in_flight), return_exceptions=True)
        progress.close()
        source.stop()
        if isinstance(windows, AsyncGenerator):
            await windows.aclose()
        # Off the loop: a read may block for up to read_timeout_s before the thread notices.
        join_timeout = stream.read_timeout_s + JOIN_SLACK_S
        if not await asyncio.to_thread(source.join, join_timeout):
            logger.warning("%s: decode thread still running after %.0fs", stream.name, join_timeout)


def _span(window: Window, score: Score, duration_s: float) -> ScoredSpan:
    end = min(window.end_s, duration_s) if duration_s > 0 else window.end_s
    frames = window.frames
    best_s = frames[min(max(score.best_frame, 0), len(frames) - 1)].pts_s if frames else None
    return ScoredSpan(
        window.start_s, max(end, window.start_s), score.significance, score.description, best_s
    )
