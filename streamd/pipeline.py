"""StreamPipeline: one source's path, ingest -> windows -> model -> events -> sink."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image as PILImage

from streamd import motion
from streamd.aggregate import EventAggregator
from streamd.config import StreamConfig
from streamd.domain import Event, EventType, Frame, Score, ScoreRequest, SourceState, Window
from streamd.errors import ModelError
from streamd.ingest import PyAVSource, SourceBreak, SourceItem, is_marker
from streamd.mailbox import Mailbox, MailboxClosed
from streamd.metrics import Metrics, StreamMetrics
from streamd.payloads import analysis_payload, encode, event_payload
from streamd.ring import FrameRing, Overflow, RingClosed
from streamd.scoring.prompt import resolve_prompt
from streamd.scoring.runner import ModelRunner
from streamd.sinks import EventSink
from streamd.store.schema import CLIPS_DIR
from streamd.window import Windower

if TYPE_CHECKING:
    from streamd.store.clips import ClipRecorder
    from streamd.store.events import EventStore

logger = logging.getLogger(__name__)

LIVE_RING_SECONDS = 4.0
"""A live stream's frame ring holds this much sampled video before dropping the oldest."""
FILE_RING_FRAMES = 8
FILE_WAKE_BATCH = 4
"""A file read as fast as possible hands frames over in fours (see ``FrameRing``)."""
SNAPSHOT_WIDTH = 640
SNAPSHOT_QUALITY = 85
SNAPSHOT_TIMEOUT_S = 5.0
RECENT_WINDOWS = 900
"""Analysed windows kept per stream for the review page's strip (an hour at a 4 s stride)."""
RECORDER_CLOSE_S = 5.0


@dataclass(frozen=True, slots=True)
class Keeping:
    """What a stream keeps for review: the event store, its clip recorder, where seq was.

    Attributes:
        store: Where event snapshots go (the messages go through the sink).
        recorder: Cuts each event's clip from the stream (None: no ``storage.dir``).
        last_seq: The stream's last event ``seq`` in the store: numbering continues there.
    """

    store: EventStore
    recorder: ClipRecorder | None = None
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class _Pending:
    """A window waiting for analysis, and when it was cut."""

    window: Window
    cut_at: float
    gated: bool = False


class StreamPipeline:
    """Runs one stream: a PyAV decode thread, the windower, analysis, events.

    Two tasks: ``window`` takes frames from the decode thread's ring and cuts windows into a
    one-slot mailbox (live: the newest replaces a waiting one, counted ``busy``; files: wait),
    and ``analyse`` sends them to the shared ``ModelRunner`` and turns scores into events.
    Failures of the source are this pipeline's business: they never escape ``run``.
    """

    def __init__(
        self,
        config: StreamConfig,
        runner: ModelRunner,
        sink: EventSink,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        keeping: Keeping | None = None,
    ) -> None:
        self.config = config
        self._keeping = keeping
        self._recorder = keeping.recorder if keeping is not None else None
        self.latest_frame: Frame | None = None
        self._recent: deque[tuple[float, float, int | None]] = deque(maxlen=RECENT_WINDOWS)
        self.name = config.name
        self.live = config.is_live
        self._runner = runner
        self._sink = sink
        self._metrics = metrics
        self._stream_metrics = metrics.for_stream(config.name)
        self._clock = clock
        self._prompt = resolve_prompt(config.profile, config.system_prompt, config.prompt)
        # Quiet windows are described always (true), never (false), or when the model has time
        # to spare (auto): no other window waits for it once this one's score is known.
        describe = config.describe_below_min
        self._describe_below = None if describe is True else config.min_significance
        self._spare = runner.has_spare_time if describe == "auto" else None
        if self.live:
            runner.add_demand(self._window_waiting)
        self._aggregator = EventAggregator(
            config.name,
            config.min_significance,
            config.cooldown_s,
            last_seq=keeping.last_seq if keeping is not None else 0,
        )
        self._mailbox: Mailbox[_Pending] = Mailbox(replace=self.live, on_replace=self._replaced)
        self.source: PyAVSource | None = None
        # (state, last error) in one attribute: /healthz reads it from another thread.
        self._status: tuple[SourceState, str | None] = (SourceState.STARTING, None)

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Ingest and analyse until the stream ends (files) or ``stop`` is called."""
        loop = asyncio.get_running_loop()
        ring = frame_ring(self.config, loop, self._stream_metrics)

        def on_state(state: SourceState, detail: str) -> None:  # called on the decode thread
            # RuntimeError: the loop is closed (a thread left running at exit): nobody listens.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_state, state, detail)

        recorder = self._recorder
        if recorder is not None:  # clips, and snapshots at the source's resolution
            recorder.start()
        self.source = PyAVSource(
            self.config,
            self._runner.backend.input_size,
            ring,
            self._stream_metrics,
            on_state=on_state,
            clock=self._clock,
            recorder=recorder,
            full_frames=recorder is not None,
        )
        self.source.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._cut(ring), name=f"streamd[{self.name}].window")
                tasks.create_task(self._analyse(), name=f"streamd[{self.name}].analyse")
        finally:
            self.source.stop()
            if recorder is not None:
                await asyncio.to_thread(recorder.close, RECORDER_CLOSE_S)

    def stop(self) -> None:
        """Graceful stop: no new frames or windows; the window being analysed may finish."""
        if self.source is not None:
            self.source.stop()
        if self._mailbox.take_pending() is not None:
            self._dropped("shutdown")
        self._mailbox.close()

    @property
    def state(self) -> SourceState:
        """The source's state, as last reported by its decode thread."""
        return self._status[0]

    @property
    def last_error(self) -> str | None:
        """Why the source last failed, until it connects again."""
        return self._status[1]

    @property
    def healthy(self) -> bool:
        """Source delivering (or a file that ended without error).

        Safe from any thread (the metrics server's): one read of an immutable pair.
        """
        state, error = self._status
        if state is SourceState.CONNECTED:
            return True
        return state in (SourceState.ENDED, SourceState.STOPPED) and error is None

    def _on_state(self, state: SourceState, detail: str) -> None:
        error = self.last_error
        if state is SourceState.CONNECTED:
            error = None
        elif state is SourceState.RECONNECTING or (
            state is SourceState.ENDED and detail != "end of stream"
        ):
            error = detail
        self._status = (state, error)
        if state is SourceState.CONNECTED:
            self._sink.stream_status(self.name, online=True)
        elif state in (SourceState.RECONNECTING, SourceState.ENDED, SourceState.STOPPED):
            self._sink.stream_status(self.name, online=False)

    # --- windows -------------------------------------------------------------------------------

    async def _cut(self, ring: FrameRing[SourceItem]) -> None:
        windower = Windower(self.name, self.config.window_s, self.config.stride_s)
        ahead = self._ahead()

        def on_frame(frame: Frame) -> None:
            self.latest_frame = frame
            if ahead is not None:
                for offered in ahead(frame):
                    self._runner.offer_frame(offered)

        try:
            async for window in windows_from(ring, windower, on_frame):
                await self._submit(window)
        except MailboxClosed:
            pass  # stop() closed it: shutting down
        finally:
            self._mailbox.close()

    def _ahead(self) -> Callable[[Frame], Sequence[Frame]] | None:
        """Which arriving frames to offer the runner for encoding before their windows.

        Live streams only (a file waits for the model anyway): every frame, so a window's
        vision is mostly done when it is cut; behind a motion gate only the frames near motion
        (``motion.MotionWatch``), since a gated window's frames are never needed.
        """
        if not self.live or not self._runner.backend.encodes_ahead:
            return None
        gate = self.config.motion_gate
        return motion.MotionWatch(gate, self.config.window_s).push if gate > 0 else _itself

    async def _submit(self, window: Window) -> None:
        self._stream_metrics.windows.inc()
        gate = self.config.motion_gate
        gated = gate > 0 and motion.analyse(window.frames).peak < gate
        logger.debug(
            "stream %s: window #%d %.1f-%.1fs, %d frames%s",
            self.name,
            window.seq,
            window.start_s,
            window.end_s,
            len(window.frames),
            " (below motion gate)" if gated else "",
        )
        await self._mailbox.put(_Pending(window, time.monotonic(), gated))

    def _window_waiting(self) -> bool:
        """A window for the model waits in the mailbox (any thread: one attribute read)."""
        pending = self._mailbox.pending
        return pending is not None and not pending.gated

    def _replaced(self, pending: _Pending) -> None:
        self._dropped("busy")

    def _dropped(self, reason: str) -> None:
        self._metrics.windows_dropped.labels(stream=self.name, reason=reason).inc()

    # --- analysis ------------------------------------------------------------------------------

    async def _analyse(self) -> None:
        try:
            while True:
                try:
                    pending = await self._mailbox.get()
                except MailboxClosed:
                    break
                if pending.gated:
                    self._dropped("motion_gate")
                    await self._observe(pending.window, Score(None, "", "below motion gate"))
                    continue
                score = await self._score(pending.window)
                if score is not None:
                    await self._scored(pending, score)
        except asyncio.CancelledError:
            self._dropped("shutdown")  # the window in the model when time ran out
            raise
        finally:
            for event in self._aggregator.finish():
                self._record(event)
                self._publish_event(event)

    async def _score(self, window: Window) -> Score | None:
        request = ScoreRequest(window, self._prompt, self._describe_below, self._spare)
        try:
            return await self._runner.score(request)
        except ModelError as exc:
            self._dropped("model_error")
            logger.warning("stream %s: window #%d not analysed: %s", self.name, window.seq, exc)
            return None

    async def _scored(self, pending: _Pending, score: Score) -> None:
        window = pending.window
        latency = time.monotonic() - pending.cut_at
        self._stream_metrics.windows_analyzed.inc()
        self._metrics.window_seconds.observe(latency)
        if score.significance is None:
            self._stream_metrics.unparsed_answers.inc()
        if self.live:
            self._stream_metrics.window_lag.set(max(0.0, self._clock() - window.wall_end_s))
        self._recent.append((window.wall_start_s, window.wall_end_s, score.significance))
        logger.info(
            "stream %s: window #%d %.1f-%.1fs significance %s: %s",
            self.name,
            window.seq,
            window.start_s,
            window.end_s,
            score.significance if score.significance is not None else "unreadable",
            score.description or "-",
        )
        self._sink.analysis(self.name, encode(analysis_payload(window, score, latency)))
        await self._observe(window, score)

    def recent_windows(self) -> list[tuple[float, float, int | None]]:
        """Analysed windows, oldest first: (wall start, wall end, significance or None)."""
        return list(self._recent)

    async def _observe(self, window: Window, score: Score) -> None:
        for event in self._aggregator.observe(window, score):
            self._record(event)
            best: Frame | None = None
            jpeg: bytes | None = None
            if event.best_window == window.seq and event.type is not EventType.END:
                best = window.frames[min(event.best_frame, len(window.frames) - 1)]
                jpeg = await self._snapshot(best)  # retained on MQTT before the event
            self._publish_event(event)
            if best is not None and jpeg is not None:
                self._keep_snapshot(event.id, best.source_jpeg or jpeg)

    def _record(self, event: Event) -> None:
        """Start, stretch or end the event's clip (the recorder writes it on its own thread)."""
        recorder = self._recorder
        if recorder is None:
            return
        if event.type is EventType.NEW:
            recorder.begin(event.id, event.start_s)
        elif event.type is EventType.UPDATE:
            recorder.extend(event.id, event.end_s)
        else:
            recorder.end(event.id, event.end_s)

    def _publish_event(self, event: Event) -> None:
        files = None if self._keeping is None else self._recorder is not None
        model = self._runner.backend.model_id
        payload = encode(event_payload(event, self.config.profile, model, files))
        # Opening and closing are state changes (INFO); an update repeats the window's line.
        level = logging.DEBUG if event.type is EventType.UPDATE else logging.INFO
        logger.log(
            level,
            "event %s %s %s (significance %d, peak %d): %s",
            event.type.value,
            self.name,
            event.id,
            event.significance,
            event.peak_significance,
            event.description or "-",
        )
        self._sink.event(event, payload)
        keeping = self._keeping
        if keeping is not None and self._recorder is not None and event.type is EventType.NEW:
            # After the sink stored the event (the store's thread runs jobs in order).
            with contextlib.suppress(RuntimeError):
                keeping.store.submit(keeping.store.set_clip, event.id, clip_name(event.id), 0)

    async def _snapshot(self, frame: Frame) -> bytes | None:
        # JPEG encoding is milliseconds of CPU: keep it off the loop.
        try:
            async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
                jpeg = await asyncio.to_thread(snapshot_jpeg, frame)
        except (TimeoutError, OSError, ValueError) as exc:
            logger.warning("stream %s: no snapshot: %s", self.name, exc)
            return None
        self._sink.snapshot(self.name, jpeg)
        return jpeg

    def _keep_snapshot(self, event_id: str, jpeg: bytes) -> None:
        """The event's snapshot file, after its message (the store runs jobs in order)."""
        keeping = self._keeping
        if keeping is not None and keeping.store.durable:
            with contextlib.suppress(RuntimeError):  # the store closed: shutting down
                keeping.store.submit(keeping.store.set_snapshot, event_id, jpeg)


def clip_name(event_id: str) -> str:
    """Where an event's clip lies, relative to ``storage.dir``."""
    return f"{CLIPS_DIR}/{event_id}.mp4"


def frame_ring(
    config: StreamConfig, loop: asyncio.AbstractEventLoop, metrics: StreamMetrics
) -> FrameRing[SourceItem]:
    """The decode thread's hand-off for a stream: live rings drop the oldest, files wait."""
    if config.is_live:
        size = max(2, round(LIVE_RING_SECONDS * config.sample_fps))
        return FrameRing(
            size, Overflow.DROP_OLDEST, loop, metrics.frames_dropped_buffer.inc, is_marker
        )
    wake_batch = 1 if config.realtime else FILE_WAKE_BATCH
    return FrameRing(
        FILE_RING_FRAMES, Overflow.WAIT, loop, is_marker=is_marker, wake_batch=wake_batch
    )


def _itself(frame: Frame) -> tuple[Frame]:
    return (frame,)


async def windows_from(
    ring: FrameRing[SourceItem],
    windower: Windower,
    on_frame: Callable[[Frame], None] | None = None,
) -> AsyncIterator[Window]:
    """Windows cut from a source's frames, tail windows included, until the source ends.

    ``on_frame`` sees every frame as it arrives, before the windows that hold it are cut.
    """
    while True:
        try:
            item = await ring.get()
        except RingClosed:
            return
        if isinstance(item, SourceBreak):
            for window in windower.flush(item.end_s):
                yield window
            if item.final:
                return
            continue
        if on_frame is not None:
            on_frame(item)
        for window in windower.push(item):
            yield window


def snapshot_jpeg(frame: Frame) -> bytes:
    """JPEG of a frame, un-squashed to the source's aspect ratio (about 10 ms)."""
    width, height = frame.source_size
    image = PILImage.fromarray(frame.image)
    if width > 0 and height > 0:
        out_w = min(SNAPSHOT_WIDTH, max(width, 1))
        out_h = max(1, round(out_w * height / width))
        image = image.resize((out_w, out_h), PILImage.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=SNAPSHOT_QUALITY)
    return buffer.getvalue()
