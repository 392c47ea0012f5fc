"""PyAV video sources: one decode thread per stream, for files, RTSP, HTTP/HLS and webcams.

Recorded media over HTTP (an MP4, an HLS VOD playlist with ``#EXT-X-ENDLIST``) is not a camera,
though its URL looks like one. The pipeline builds its hand-off from ``StreamConfig.is_live``
before anything is opened, so the source itself decides once it has opened an http(s) URL for
the first time: a container with a duration is finite (FFmpeg's hls demuxer sets a duration
only when the playlist has ENDLIST). With ``live: auto`` a finite source is read at 1x, so
frame wall times are right on the live path the pipeline built, and it ends at its end (state
ENDED, no reconnect loop). With ``live: true`` a finite source is read at 1x and played in a
loop, like a file with ``live: true``. Everything else over HTTP (a live HLS playlist, an
MJPEG camera) stays a camera that reconnects.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import av.audio.stream
import av.container
import av.error
import av.stream
import av.video.frame
import av.video.stream
import numpy as np

from streamd.backoff import backoff_delay
from streamd.config import StreamConfig, is_file_url
from streamd.domain import LEGAL_TRANSITIONS, Frame, SourceState
from streamd.errors import SourceError
from streamd.log import redact_url
from streamd.metrics import StreamMetrics
from streamd.ring import FrameRing
from streamd.sampling import FrameSampler, Timeline
from streamd.store.clips import ClipRecorder, snapshot_jpeg
from streamd.store.packets import AnyPacket

logger = logging.getLogger(__name__)

MAX_DEMUX_ERRORS_IN_A_ROW = 20
"""Corrupt container data: skip and resync this many times in a row before giving up."""
FRAME_TIMEOUT_FACTOR = 2.0
"""No decodable frame for ``FRAME_TIMEOUT_FACTOR * read_timeout_s`` = the source is lost."""
METRIC_FLUSH_FRAMES = 256
RTSP_ANALYZE_S = 0.5
"""Probe an RTSP stream this long on open (FFmpeg's default, 5 s, makes every (re)connect ~3 s)."""
RECORDED_SCHEMES = ("http://", "https://")
"""Network URLs that may hold recorded media (decided when opened, see the module docstring)."""


@dataclass(frozen=True, slots=True)
class SourceBreak:
    """A marker in the frame ring: the connection was lost (``final=False``) or the stream ended.

    Attributes:
        final: True at end of file or when the source stops for good.
        end_s: Where the content ended, stream seconds (None if no frame was seen).
        error: Why, for a failure.
    """

    final: bool
    end_s: float | None = None
    error: str | None = None


SourceItem = Frame | SourceBreak
StateListener = Callable[[SourceState, str], None]


def is_marker(item: SourceItem) -> bool:
    """Ring predicate: markers bypass capacity and are never dropped."""
    return isinstance(item, SourceBreak)


def open_options(url: str, read_timeout_s: float) -> tuple[str | None, dict[str, str]]:
    """Demuxer format and options for a URL (RTSP over TCP with a socket timeout, v4l2...)."""
    if url.startswith(("rtsp://", "rtsps://")):
        return None, {
            "rtsp_transport": "tcp",
            "timeout": str(int(read_timeout_s * 1e6)),
            "analyzeduration": str(int(RTSP_ANALYZE_S * 1e6)),
        }
    if url.startswith("/dev/video"):
        return "v4l2", {}
    return None, {}


class PyAVSource:
    """Decodes one stream on its own thread and hands sampled, resized frames to a ring.

    Live sources reconnect forever with capped full-jitter backoff; a decode loop that ends
    normally (a killed RTSP server does that) counts as a disconnect. Files end at end of file.
    Every state change is logged once, with credentials redacted.

    With a ``recorder``, the first audio stream is demuxed too and every packet goes to it, with
    its time in stream seconds: the frames' mapping (``Timeline.offset_s``), or None until a
    live connection's first timestamped frame fixes it. ``full_frames`` adds a JPEG of each
    sampled frame at the source's resolution (``Frame.source_jpeg``), encoded here.
    """

    def __init__(
        self,
        config: StreamConfig,
        input_size: tuple[int, int],
        ring: FrameRing[SourceItem],
        metrics: StreamMetrics,
        on_state: StateListener = lambda _state, _detail: None,
        clock: Callable[[], float] = time.time,
        *,
        recorder: ClipRecorder | None = None,
        full_frames: bool = False,
    ) -> None:
        self.config = config
        self.name = config.name
        self.live = config.is_live
        self.input_size = input_size
        self._ring = ring
        self._metrics = metrics
        self._on_state = on_state
        self._clock = clock
        self._recorder = recorder
        self._full_frames = full_frames
        # A file with ``live: true`` plays in a loop at 1x, like a camera.
        self._loops = self.live and is_file_url(config.url)
        self._pace = config.realtime or self._loops
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not crypto
        self.state = SourceState.STARTING
        self._started_wall = clock()
        self._index = 0
        self._sampler = FrameSampler(config.sample_fps)
        self._last_pts: float | None = None
        self._frame_period_s = 0.0
        self._connected_once = False
        # http(s) with live auto or true: whether it is recorded media is known once opened.
        self._probe_finite = self.live and config.url.startswith(RECORDED_SCHEMES)

    # --- control (event loop) --------------------------------------------------------------

    def start(self) -> None:
        """Start the decode thread."""
        self._started_wall = self._clock()
        self._thread = threading.Thread(
            target=self._run, name=f"streamd[{self.name}].decode", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop; it notices within a read timeout at most."""
        self._stop.set()
        self._ring.close()

    def join(self, timeout: float) -> bool:
        """Wait for the thread; True if it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        error: str | None = None
        looping = False
        try:
            while not self._stop.is_set():
                delivered, reason, failed = self._connect_and_read(looping)
                looping = self._loops and delivered and not failed and not self._stop.is_set()
                if self._recorder is not None and not looping:
                    self._recorder.on_disconnect()  # a looped file starting over is no gap
                if self._stop.is_set():
                    return  # stop(), not a lost source: STOPPED, no "reconnecting"
                if looping:
                    logger.debug("stream %s: end of file, playing it again", self.name)
                    continue
                self._metrics.stream_up.set(0)
                if not self.live:
                    error = reason if failed else None
                    self._set_state(SourceState.ENDED, reason, failed=failed)
                    return
                self._ring.put(SourceBreak(final=False, end_s=self._end_s(), error=reason))
                self._set_state(SourceState.RECONNECTING, reason)
                attempt = 1 if delivered else attempt + 1
                self._stop.wait(backoff_delay(attempt, self._rng))
        finally:
            self._metrics.stream_up.set(0)
            self._ring.put(SourceBreak(final=True, end_s=self._end_s(), error=error))
            self._ring.close()
            if self.state is not SourceState.ENDED:
                self._set_state(SourceState.STOPPED, "stopped")

    def _connect_and_read(self, looping: bool) -> tuple[bool, str, bool]:
        """One connection: ``(delivered any frame, why it ended, whether that was a failure)``.

        ``looping``: this is a looped file starting over, not a reconnect.
        """
        opened_at = self._clock()
        first_index = self._index
        try:
            container = self._open()
        except SourceError as exc:
            return False, str(exc), True
        try:
            with container:
                stream = _video_stream(container)
                if self._probe_finite:
                    self._adapt_to(container)
                if self._connected_once and not looping:
                    self._metrics.reconnects.inc()
                self._connected_once = True
                self._metrics.stream_up.set(1)
                self._set_state(SourceState.CONNECTED, _describe(stream))
                audio = None  # demuxed only for the recorder
                if self._recorder is not None:
                    audio = container.streams.audio[0] if container.streams.audio else None
                    self._recorder.on_connect(container, stream, audio)
                delivered = self._read(container, (stream, audio), opened_at)
                return delivered, "end of stream", False
        except SourceError as exc:
            return self._index > first_index, str(exc), True

    def _adapt_to(self, container: av.container.InputContainer) -> None:
        """First open of an http(s) source: recorded media is paced at 1x and ends (or loops)."""
        self._probe_finite = False
        if container.duration is None:
            return  # no end known: a live feed
        duration_s = container.duration / av.time_base
        self._pace = True
        if self.config.live == "auto":
            self.live = False
            ending = "ends at its end"
        else:
            self._loops = True
            ending = "plays in a loop (live: true)"
        logger.info(
            "stream %s: recorded media (%.1fs), not a camera: read at 1x, %s",
            self.name,
            duration_s,
            ending,
        )

    def _open(self) -> av.container.InputContainer:
        cfg = self.config
        fmt, options = open_options(cfg.url, cfg.read_timeout_s)
        url = cfg.url.removeprefix("file://")
        try:
            container = av.open(
                url,
                mode="r",
                format=fmt,
                options=options,
                timeout=(cfg.open_timeout_s, cfg.read_timeout_s),
            )
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {redact_url(cfg.url)}: {_reason(exc)}") from exc
        if not container.streams.video:
            container.close()
            raise SourceError(f"{redact_url(cfg.url)} has no video stream")
        return container

    def _read(
        self,
        container: av.container.InputContainer,
        streams: tuple[av.video.stream.VideoStream, av.audio.stream.AudioStream | None],
        opened_at: float,
    ) -> bool:
        """Decode until end of stream or stop; returns whether any frame was sampled.

        A live connection's first frame is placed at ``opened_at`` (when ``av.open`` began), not
        after the open: the frames buffered while probing were captured back then.
        """
        stream = streams[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        self._frame_period_s = 1 / float(rate)
        origin = None
        if not self.live and container.start_time is not None:
            origin = container.start_time / av.time_base
        base = opened_at - self._started_wall if self.live else 0.0
        if self._last_pts is not None:
            base = max(base, self._last_pts + 1 / float(rate))
        timeline = Timeline(1 / float(rate), base_s=base, live=self.live, origin=origin)
        wall_origin = self._started_wall if self.live else self._clock()
        frame_timeout = FRAME_TIMEOUT_FACTOR * self.config.read_timeout_s
        first_index = self._index
        decoded = 0
        busy = 0.0  # decoder time since the last sampled frame
        last_frame_at = time.monotonic()
        for frame in self._frames(container, streams, timeline):
            now = time.monotonic()
            if frame is None:  # a packet that gave no frame: watch for a stalled decoder
                if now - last_frame_at > frame_timeout:
                    raise SourceError(f"no decodable frame for {now - last_frame_at:.0f}s")
                continue
            last_frame_at = now
            decoded += 1
            pts = timeline.resolve(frame.time)
            if not self._sampler.offer(pts):
                if decoded >= METRIC_FLUSH_FRAMES:
                    self._metrics.frames_decoded.inc(decoded)
                    decoded = 0
                continue
            started = time.perf_counter()
            sampled = self._sample(frame, pts, wall_origin)
            busy += time.perf_counter() - started
            self._metrics.frames_decoded.inc(decoded)
            decoded = 0
            if sampled is None:
                continue
            self._metrics.decode_seconds.observe(busy)
            busy = 0.0
            if self._pace:
                self._stop.wait(max(0.0, sampled.wall_s - self._clock()))
            if not self._ring.put(sampled) and self._ring.closed:
                break
        self._metrics.frames_decoded.inc(decoded)
        return self._index > first_index

    def _sample(
        self, frame: av.video.frame.VideoFrame, pts: float, wall_origin: float
    ) -> Frame | None:
        width, height = self.input_size
        try:
            image = frame.to_ndarray(
                width=width, height=height, format="rgb24", interpolation="BICUBIC"
            )
            jpeg = snapshot_jpeg(frame) if self._full_frames else None
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            self._metrics.decode_errors.inc()
            logger.debug("stream %s: cannot convert frame: %s", self.name, exc)
            return None
        self._metrics.frames_sampled.inc()
        self._last_pts = pts
        index = self._index
        self._index += 1
        return Frame(
            stream=self.name,
            index=index,
            pts_s=pts,
            wall_s=wall_origin + pts,
            image=image.astype(np.uint8, copy=False),
            source_size=(frame.width, frame.height),
            source_jpeg=jpeg,
        )

    def _frames(
        self,
        container: av.container.InputContainer,
        streams: tuple[av.video.stream.VideoStream, av.audio.stream.AudioStream | None],
        timeline: Timeline,
    ) -> Iterator[av.video.frame.VideoFrame | None]:
        """Decoded frames of the video (None after a packet that gave none), skipping bad data.

        Audio is demuxed only for the recorder, data streams never. The recorder gets each
        packet after its frames went through ``timeline``. A corrupt packet is counted and
        skipped; a demuxer error resyncs by restarting the demux iterator, up to a limit.
        """
        stream, audio = streams
        demuxed: tuple[av.stream.Stream, ...] = (stream,) if audio is None else (stream, audio)
        errors_in_a_row = 0
        while not self._stop.is_set():
            try:
                for packet in container.demux(*demuxed):
                    if self._stop.is_set():
                        return
                    errors_in_a_row = 0
                    if packet.stream_index == stream.index:
                        yield from self._decode(stream, packet)
                    if self._recorder is not None:
                        self._recorder.on_packet(packet, _stream_seconds(packet, timeline))
                return
            except av.error.EOFError:
                return
            except av.error.InvalidDataError as exc:
                self._metrics.decode_errors.inc()
                errors_in_a_row += 1
                if errors_in_a_row > MAX_DEMUX_ERRORS_IN_A_ROW:
                    raise SourceError(f"unreadable data: {_reason(exc)}") from exc
            except (av.error.FFmpegError, OSError) as exc:
                raise SourceError(_reason(exc)) from exc

    def _decode(
        self, stream: av.video.stream.VideoStream, packet: AnyPacket
    ) -> Iterator[av.video.frame.VideoFrame | None]:
        try:
            frames = stream.decode(packet)
        except (av.error.InvalidDataError, av.error.UndefinedError, ValueError):
            self._metrics.decode_errors.inc()
            return
        if not frames:
            yield None
        yield from frames

    def _end_s(self) -> float | None:
        """Where the content seen so far ends: the last sample plus the gap to the next one."""
        if self._last_pts is None:
            return None
        return self._last_pts + max(1 / self.config.sample_fps, self._frame_period_s)

    def _set_state(self, state: SourceState, detail: str, failed: bool = False) -> None:
        if state is self.state:
            return
        if state not in LEGAL_TRANSITIONS[self.state]:
            logger.error("stream %s: illegal transition %s -> %s", self.name, self.state, state)
        previous, self.state = self.state, state
        url = redact_url(self.config.url)
        if state is SourceState.CONNECTED:
            logger.info("stream %s connected: %s (%s)", self.name, url, detail)
        elif state is SourceState.RECONNECTING:
            log = logger.warning if previous is SourceState.CONNECTED else logger.error
            log("stream %s lost (%s): %s; reconnecting", self.name, url, detail)
        elif state is SourceState.ENDED:
            (logger.error if failed else logger.info)("stream %s ended: %s", self.name, detail)
        else:
            logger.info("stream %s %s", self.name, state.value)
        self._on_state(state, detail)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    return container.streams.video[0]


def _stream_seconds(packet: AnyPacket, timeline: Timeline) -> float | None:
    """A packet's pts (or dts) on the frames' clock; None while that mapping is unknown."""
    ticks = packet.pts if packet.pts is not None else packet.dts
    offset = timeline.offset_s()
    if ticks is None or offset is None:
        return None
    return float(ticks * packet.time_base) + offset


def _describe(stream: av.video.stream.VideoStream) -> str:
    rate = stream.average_rate or stream.guessed_rate
    fps = f"{float(rate):.3g} fps" if rate else "fps unknown"
    codec = stream.codec_context.name if stream.codec_context else "?"
    return f"{codec} {stream.width}x{stream.height} {fps}"


def _reason(exc: BaseException) -> str:
    """Short human reason for a PyAV/OS error, without the URL (which may hold a password)."""
    # ExitError: PyAV's interrupt callback aborted a read that ran past the timeout.
    if isinstance(exc, av.error.TimeoutError | av.error.ExitError | TimeoutError):
        return "timed out"
    if isinstance(exc, av.error.FFmpegError):
        return str(exc.strerror or type(exc).__name__)
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc)
