"""Video ingest end to end: PyAVSource -> FrameRing -> windows, on real clips and cameras.

Real PyAV-encoded clips, a real GStreamer RTSP server, a real HTTP server: no mocks. Every
wait is bounded; conditions are polled, never slept on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import streamd.backoff
from streamd.backoff import backoff_delay
from streamd.config import StreamConfig
from streamd.domain import Frame, SourceState, Window
from streamd.ingest import (
    PyAVSource,
    SourceBreak,
    SourceItem,
    is_marker,
    open_options,
)
from streamd.log import redact_url
from streamd.metrics import Metrics
from streamd.pipeline import windows_from
from streamd.ring import FrameRing, Overflow, RingClosed
from streamd.window import Windower
from tests.conftest import RtspServerFactory, require_rtsp
from tests.media import ClipSet, Segment, write_clip, write_hls
from tests.rtsp import RtspServer

STREAM = "cam"
INPUT_SIZE = (96, 64)  # (width, height) the model wants
FILE_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 10.0
POLL_S = 0.01
RTSP_READ_S = 1.0
RTSP_OPEN_S = 3.0
RTSP_TIMEOUT_S = 8.0  # one open (~0.6 s) plus backoff, with room for a loaded machine

# --- harness --------------------------------------------------------------------------------


@dataclass
class Run:
    """One source under test, its ring, metrics and everything it handed over."""

    source: PyAVSource
    ring: FrameRing[SourceItem]
    registry: CollectorRegistry
    states: list[tuple[SourceState, str]]
    items: list[SourceItem] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # time.time() of each item
    consumer: asyncio.Task[None] | None = None

    @property
    def frames(self) -> list[Frame]:
        return [item for item in self.items if isinstance(item, Frame)]

    @property
    def breaks(self) -> list[SourceBreak]:
        return [item for item in self.items if isinstance(item, SourceBreak)]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, {"stream": STREAM, **labels})
        assert value is not None, f"no sample {name}"
        return value

    def state(self) -> SourceState:
        """The source's state now (a call, so that type checkers do not narrow it)."""
        return self.source.state

    def take(self, item: SourceItem) -> None:
        self.items.append(item)
        self.received_at.append(time.time())

    async def drain(self, within_s: float = FILE_TIMEOUT_S) -> list[SourceItem]:
        """Consume until the source closes the ring (a file's end)."""
        async with asyncio.timeout(within_s):
            while True:
                try:
                    self.take(await self.ring.get())
                except RingClosed:
                    break
        assert self.source.join(JOIN_TIMEOUT_S), "decode thread did not end"
        return self.items

    def consume(self) -> None:
        """Consume in the background (live sources)."""

        async def loop() -> None:
            while True:
                try:
                    self.take(await self.ring.get())
                except RingClosed:
                    return

        self.consumer = asyncio.create_task(loop(), name="test-consumer")

    async def until(
        self, condition: Callable[[], bool], what: str, within_s: float = RTSP_TIMEOUT_S
    ) -> float:
        """Poll ``condition``; returns the seconds it took."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(within_s):
                while not condition():
                    if self.consumer is not None and self.consumer.done():
                        self.consumer.result()  # surface a consumer failure
                    await asyncio.sleep(POLL_S)
        except TimeoutError:
            pytest.fail(f"no {what} within {within_s}s; source {self.state()}")
        return time.monotonic() - started

    def stop(self) -> None:
        self.source.stop()
        assert self.source.join(JOIN_TIMEOUT_S), "decode thread did not stop"


class StartSource(Protocol):
    def __call__(
        self,
        url: str | Path,
        *,
        ring_size: int = ...,
        overflow: Overflow = ...,
        consume: bool = ...,
        **config: Any,
    ) -> Run: ...


@pytest.fixture
async def start_source() -> AsyncIterator[StartSource]:
    """Start a PyAVSource on a fresh registry and a real ring on the running loop."""
    runs: list[Run] = []

    def start(
        url: str | Path,
        *,
        ring_size: int = 8,
        overflow: Overflow = Overflow.WAIT,
        consume: bool = False,
        **config: Any,
    ) -> Run:
        registry = CollectorRegistry()
        metrics = Metrics(registry).for_stream(STREAM)
        ring: FrameRing[SourceItem] = FrameRing(
            maxsize=ring_size,
            overflow=overflow,
            loop=asyncio.get_running_loop(),
            on_drop=metrics.frames_dropped_buffer.inc,
            is_marker=is_marker,
        )
        states: list[tuple[SourceState, str]] = []
        cfg = StreamConfig(name=STREAM, url=str(url), **config)
        source = PyAVSource(
            cfg, INPUT_SIZE, ring, metrics, on_state=lambda s, d: states.append((s, d))
        )
        run = Run(source, ring, registry, states)
        runs.append(run)
        source.start()
        if consume:
            run.consume()
        return run

    yield start
    for run in runs:
        run.source.stop()
    for run in runs:
        assert run.source.join(JOIN_TIMEOUT_S), "decode thread did not stop"
        if run.consumer is not None:
            run.consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.consumer


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamd.backoff, "BACKOFF_BASE_S", 0.05)
    monkeypatch.setattr(streamd.backoff, "BACKOFF_CAP_S", 0.2)


def assert_ended_cleanly(run: Run) -> None:
    assert run.items, "nothing at all came out"
    last = run.items[-1]
    assert isinstance(last, SourceBreak)
    assert last.final
    assert last.error is None
    assert run.breaks == [last]  # a file has no gaps
    assert run.state() is SourceState.ENDED
    assert [s for s, _ in run.states] == [SourceState.CONNECTED, SourceState.ENDED]
    assert run.states[-1][1] == "end of stream"
    assert run.metric("streamd_stream_up") == 0
    assert run.ring.closed


def streamd_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("streamd")]


def pts_of(frames: list[Frame]) -> list[float]:
    return [f.pts_s for f in frames]


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["static", "motion", "h264", "h264_mkv", "long"])
async def test_file_sampled_at_1fps(start_source: StartSource, clips: ClipSet, name: str) -> None:
    clip = getattr(clips, name)
    run = start_source(clip.path, sample_fps=1)
    await run.drain()
    seconds = round(clip.duration_s)
    assert pts_of(run.frames) == pytest.approx([float(i) for i in range(seconds)], abs=1e-6)
    assert [f.index for f in run.frames] == list(range(seconds))
    assert all(f.stream == STREAM for f in run.frames)
    assert run.metric("streamd_frames_decoded_total") == clip.frame_count
    assert run.metric("streamd_frames_sampled_total") == seconds
    assert run.metric("streamd_decode_errors_total") == 0
    assert run.breaks[-1].end_s == pytest.approx(seconds)
    assert_ended_cleanly(run)


async def test_sample_rate_above_source_rate_keeps_every_frame(
    start_source: StartSource, clips: ClipSet
) -> None:
    clip = clips.h264
    run = start_source(clip.path, sample_fps=30)
    await run.drain()
    expected = [i / clip.fps for i in range(clip.frame_count)]
    assert pts_of(run.frames) == pytest.approx(expected, abs=1e-6)
    assert run.metric("streamd_frames_decoded_total") == clip.frame_count
    assert run.metric("streamd_frames_sampled_total") == clip.frame_count
    assert_ended_cleanly(run)


async def test_frames_are_resized_rgb_uint8(start_source: StartSource, clips: ClipSet) -> None:
    clip = clips.scenecut  # black 0-4 s, white 4-8 s
    run = start_source(clip.path, sample_fps=1)
    await run.drain()
    assert len(run.frames) == 8
    width, height = INPUT_SIZE
    for frame in run.frames:
        assert frame.image.shape == (height, width, 3)
        assert frame.image.dtype == np.uint8
        assert frame.source_size == (clip.width, clip.height)
    means = [float(f.image.mean()) for f in run.frames]
    assert all(m < 30 for m in means[:4]), means
    assert all(m > 225 for m in means[4:]), means
    # Bars: vertical stripes survive the resize, in every channel.
    motion = start_source(clips.motion.path, sample_fps=1)
    await motion.drain()
    row = motion.frames[0].image[height // 2].astype(int)
    assert row.min() < 40
    assert row.max() > 215
    assert np.abs(row[:, 0] - row[:, 1]).max() <= 2  # gray bars: R == G == B


async def test_audio_is_ignored(start_source: StartSource, clips: ClipSet, tmp_path: Path) -> None:
    with_audio = clips.with_audio
    silent = write_clip(tmp_path / "silent.mp4", with_audio.segments)  # same script, no audio
    a = start_source(with_audio.path, sample_fps=30)
    b = start_source(silent.path, sample_fps=30)
    await a.drain()
    await b.drain()
    assert len(a.frames) == with_audio.frame_count == 40
    assert pts_of(a.frames) == pytest.approx(pts_of(b.frames), abs=1e-6)
    for fa, fb in zip(a.frames, b.frames, strict=True):
        diff = np.abs(fa.image.astype(int) - fb.image.astype(int))
        assert diff.mean() < 1.0
    assert a.metric("streamd_frames_decoded_total") == with_audio.frame_count
    assert a.metric("streamd_decode_errors_total") == 0
    assert_ended_cleanly(a)


async def test_wait_overflow_applies_backpressure(
    start_source: StartSource, clips: ClipSet
) -> None:
    clip = clips.h264
    run = start_source(clip.path, sample_fps=30, ring_size=2, overflow=Overflow.WAIT)
    ahead = []  # frames the decoder had sampled beyond what the consumer had taken
    async with asyncio.timeout(FILE_TIMEOUT_S):
        while True:
            try:
                item = await run.ring.get()
            except RingClosed:
                break
            run.take(item)
            ahead.append(run.metric("streamd_frames_sampled_total") - len(run.frames))
            await asyncio.sleep(0.003)  # a slow consumer (the model), not a synchronisation
    assert run.source.join(JOIN_TIMEOUT_S)
    assert [f.index for f in run.frames] == list(range(clip.frame_count))
    assert run.ring.dropped == 0
    assert run.metric("streamd_frames_dropped_total", reason="buffer_full") == 0
    # The decoder waits for the consumer: never more than the ring plus the frame in hand.
    assert max(ahead) <= run.ring.maxsize + 1
    assert_ended_cleanly(run)


async def test_realtime_paces_at_1x(start_source: StartSource, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "short.mp4", [Segment(1.5, "bars")])
    started = time.time()
    run = start_source(clip.path, sample_fps=10, realtime=True)
    await run.drain()
    elapsed = time.time() - started
    assert len(run.frames) == clip.frame_count
    assert elapsed >= clip.duration_s * 0.9, elapsed
    # No frame is handed over before the moment it shows.
    for frame, at in zip(run.items, run.received_at, strict=True):
        if isinstance(frame, Frame):
            assert at >= frame.wall_s - 0.01
    assert_ended_cleanly(run)


async def test_live_file_loops_seamlessly(start_source: StartSource, tmp_path: Path) -> None:
    # `live: true` on a file plays it in a loop at 1x, like a camera: no reconnects, no gaps.
    clip = write_clip(tmp_path / "loop.mp4", [Segment(1.0, "bars")], fps=10)
    run = start_source(clip.path, live=True, sample_fps=10, consume=True, ring_size=32)
    await run.until(lambda: len(run.frames) >= 3 * clip.frame_count, "three loops", 15)
    pts = [frame.pts_s for frame in run.frames]
    assert all(b > a for a, b in itertools.pairwise(pts))
    gaps = [b - a for a, b in itertools.pairwise(pts)]
    assert max(gaps) < 0.5  # the seam between two plays is about one frame, not a reconnect
    assert run.breaks == []
    assert run.metric("streamd_reconnects_total") == 0
    assert run.metric("streamd_stream_up") == 1
    assert [state for state, _ in run.states] == [SourceState.CONNECTED]


@pytest.mark.parametrize(("sample_fps", "expected"), [(30, 38), (1, 4)])
async def test_truncated_mkv_decodes_up_to_the_cut(
    start_source: StartSource, clips: ClipSet, sample_fps: float, expected: int
) -> None:
    run = start_source(clips.truncated, sample_fps=sample_fps)
    await run.drain()
    step = 1 / min(sample_fps, clips.h264_mkv.fps)
    assert pts_of(run.frames) == pytest.approx([i * step for i in range(expected)], abs=1e-6)
    assert run.metric("streamd_frames_decoded_total") == 38
    assert_ended_cleanly(run)


async def test_unopenable_mp4_ends_with_an_error(
    start_source: StartSource, clips: ClipSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd")
    path = clips.truncated_mp4
    run = start_source(path, sample_fps=1)
    await run.drain()
    assert run.frames == []
    (final,) = run.breaks
    assert final.final
    assert final.error is not None
    assert str(path) in final.error
    assert final.error.startswith("cannot open")
    assert run.state() is SourceState.ENDED
    assert [s for s, _ in run.states] == [SourceState.ENDED]
    errors = [r.getMessage() for r in streamd_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert str(path) in errors[0]
    assert run.metric("streamd_stream_up") == 0


async def test_corrupt_file_is_survived(start_source: StartSource, clips: ClipSet) -> None:
    run = start_source(clips.corrupt, sample_fps=30)
    await run.drain()
    errors = run.metric("streamd_decode_errors_total")
    assert errors > 0 or len(run.frames) < clips.h264.frame_count
    assert run.frames, "the undamaged part decodes"
    pts = pts_of(run.frames)
    assert pts == sorted(set(pts))
    assert run.breaks[-1].final
    assert run.state() is SourceState.ENDED


async def test_hls_over_http(
    start_source: StartSource, clips: ClipSet, http_server: Callable[[Path], str]
) -> None:
    playlist = clips.hls
    base = http_server(playlist.parent)
    run = start_source(f"{base}/{playlist.name}", live=False, sample_fps=30)
    await run.drain()
    assert pts_of(run.frames) == pytest.approx([i / 10 for i in range(70)], abs=1e-6)
    assert run.metric("streamd_frames_decoded_total") == 70
    means = [float(f.image.mean()) for f in run.frames]
    assert max(means[:30]) < 30  # black 0-3 s
    assert min(means[30:]) > 60  # bars 3-7 s
    assert_ended_cleanly(run)


# --- recorded media over HTTP (issue 7) ----------------------------------------------------


def serve_recording(kind: str, directory: Path, http_server: Callable[[Path], str]) -> str:
    """An MP4 or an HLS VOD playlist (with ENDLIST), 2 s of bars at 10 fps, over real HTTP."""
    if kind == "mp4":
        write_clip(directory / "clip.mp4", [Segment(2, "bars")])
        return f"{http_server(directory)}/clip.mp4"
    playlist = write_hls(directory, [Segment(2, "bars")], hls_time_s=1)
    assert "#EXT-X-ENDLIST" in playlist.read_text()
    return f"{http_server(directory)}/{playlist.name}"


def assert_on_time(run: Run) -> None:
    """Each frame was handed over at the moment it shows: no wall time in the future."""
    now = time.time()
    for item, at in zip(run.items, run.received_at, strict=True):
        if isinstance(item, Frame):
            assert item.wall_s <= at + 0.05, (item.wall_s, at)
            assert item.wall_s <= now
            assert at - item.wall_s < 1.0  # and not read late either: paced, not buffered


@pytest.mark.parametrize("kind", ["mp4", "hls_vod"])
async def test_recorded_media_over_http_ends_at_1x(
    start_source: StartSource,
    http_server: Callable[[Path], str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    # live: auto on an http URL: the pipeline built a live (drop-oldest) ring before opening.
    caplog.set_level(logging.INFO, logger="streamd")
    url = serve_recording(kind, tmp_path, http_server)
    started = time.time()
    run = start_source(url, sample_fps=10, ring_size=40, overflow=Overflow.DROP_OLDEST)
    await run.drain()
    elapsed = time.time() - started
    assert len(run.frames) == 20
    assert elapsed >= 2.0 * 0.9, elapsed  # read at 1x, not at decode speed
    assert_on_time(run)
    assert run.metric("streamd_reconnects_total") == 0
    assert run.metric("streamd_frames_dropped_total", reason="buffer_full") == 0
    assert_ended_cleanly(run)
    messages = [r.getMessage() for r in streamd_records(caplog)]
    assert sum("stream cam ended: end of stream" in m for m in messages) == 1
    assert not [m for m in messages if "lost" in m or "reconnecting" in m]
    assert sum("recorded media" in m for m in messages) == 1


async def test_recorded_media_over_http_read_as_live_loops_at_1x(
    start_source: StartSource, http_server: Callable[[Path], str], tmp_path: Path
) -> None:
    clip = write_clip(tmp_path / "clip.mp4", [Segment(1.0, "bars")])
    url = f"{http_server(tmp_path)}/clip.mp4"
    run = start_source(
        url, live=True, sample_fps=10, ring_size=40, overflow=Overflow.DROP_OLDEST, consume=True
    )
    await run.until(lambda: len(run.frames) >= 2 * clip.frame_count + 2, "two plays", 15)
    assert_on_time(run)
    pts = pts_of(run.frames)
    assert all(b > a for a, b in itertools.pairwise(pts))
    assert run.breaks == []
    assert run.metric("streamd_reconnects_total") == 0
    assert [state for state, _ in run.states] == [SourceState.CONNECTED]


async def test_live_hls_over_http_stays_a_camera(
    start_source: StartSource,
    http_server: Callable[[Path], str],
    tmp_path: Path,
    fast_backoff: None,
) -> None:
    # No ENDLIST: a live playlist that stopped growing. FFmpeg gives no duration: a camera.
    playlist = write_hls(tmp_path, [Segment(3, "bars")], hls_time_s=1)
    text = playlist.read_text()
    playlist.write_text(
        text.replace("#EXT-X-ENDLIST\n", "").replace("#EXT-X-PLAYLIST-TYPE:VOD\n", "")
    )
    url = f"{http_server(tmp_path)}/{playlist.name}"
    run = start_source(url, **rtsp_config(sample_fps=10))
    await run.until(lambda: run.metric("streamd_reconnects_total") >= 1, "a reconnect", 20)
    assert run.source.live
    assert SourceState.RECONNECTING in [state for state, _ in run.states]
    assert run.frames


async def test_stop_mid_file_is_stopped_not_ended(
    start_source: StartSource, clips: ClipSet
) -> None:
    run = start_source(clips.long.path, sample_fps=30, ring_size=1)
    # Nobody consumes: the decoder blocks on the full ring.
    await run.until(lambda: run.metric("streamd_frames_sampled_total") >= 2, "a blocked decoder")
    run.stop()
    assert run.state() is SourceState.STOPPED
    assert [s for s, _ in run.states] == [SourceState.CONNECTED, SourceState.STOPPED]


# --- windows end to end ---------------------------------------------------------------------


async def test_windows_from_a_file(start_source: StartSource, clips: ClipSet) -> None:
    clip = clips.activity  # 16 s
    assert clip.duration_s == 16
    run = start_source(clip.path, sample_fps=1, window_s=4, stride_s=2)
    windows: list[Window] = []
    async with asyncio.timeout(FILE_TIMEOUT_S):
        async for window in windows_from(run.ring, Windower(STREAM, 4, 2)):
            windows.append(window)
    assert run.source.join(JOIN_TIMEOUT_S)
    assert [w.start_s for w in windows] == pytest.approx([0, 2, 4, 6, 8, 10, 12])
    assert [w.end_s for w in windows] == pytest.approx([4, 6, 8, 10, 12, 14, 16])
    assert [w.seq for w in windows] == list(range(1, 8))
    for window in windows:
        start = round(window.start_s)
        assert pts_of(list(window.frames)) == pytest.approx([start + i for i in range(4)])
        assert all(f.image.shape == (64, 96, 3) for f in window.frames)
    assert [w.partial for w in windows] == [False] * 6 + [True]
    assert windows[-1].frames[-1].pts_s == pytest.approx(15.0)  # the last frame is covered
    assert run.state() is SourceState.ENDED


# --- RTSP -----------------------------------------------------------------------------------


def rtsp_config(**overrides: Any) -> dict[str, Any]:
    return {
        "sample_fps": 10,
        "read_timeout_s": RTSP_READ_S,
        "open_timeout_s": RTSP_OPEN_S,
        "ring_size": 100,
        "overflow": Overflow.DROP_OLDEST,
        "consume": True,
    } | overrides


def frames_after(run: Run, item: SourceItem) -> list[Frame]:
    position = next(i for i, x in enumerate(run.items) if x is item)
    return [f for f in run.items[position:] if isinstance(f, Frame)]


@pytest.mark.rtsp
async def test_rtsp_live_frames_and_stream_up(
    rtsp_server: RtspServerFactory, start_source: StartSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd")
    server = rtsp_server(live=True)
    run = start_source(server.url, **rtsp_config())
    assert run.source.live
    await run.until(lambda: len(run.frames) >= 15, "frames")
    assert run.metric("streamd_stream_up") == 1
    assert run.state() is SourceState.CONNECTED
    frames = run.frames
    pts = pts_of(frames)
    assert pts == sorted(pts)
    assert pts[-1] - pts[0] == pytest.approx((len(frames) - 1) / 10, abs=0.05)
    assert frames[0].image.shape == (64, 96, 3)
    assert frames[0].source_size == (64, 48)
    # Stream time starts when the connection was opened, not after FFmpeg's probe: no frame
    # claims a wall time later than the moment it was handed over.
    assert pts[0] < 0.3, pts[0]
    for item, at in zip(run.items, run.received_at, strict=True):
        if isinstance(item, Frame):
            assert item.wall_s <= at + 0.25, (item.pts_s, item.wall_s - at)
    # A stop is a stop: no "lost ... reconnecting" on the way out.
    run.stop()
    assert [s for s, _ in run.states] == [SourceState.CONNECTED, SourceState.STOPPED]
    assert not [r for r in streamd_records(caplog) if r.levelno >= logging.WARNING]


@pytest.mark.rtsp
@pytest.mark.usefixtures("fast_backoff")
async def test_rtsp_kill_then_restart(
    rtsp_server: RtspServerFactory, start_source: StartSource
) -> None:
    server = rtsp_server(live=True)
    run = start_source(server.url, **rtsp_config())
    await run.until(lambda: len(run.frames) >= 5, "first frames")
    server.kill()
    await run.until(lambda: bool(run.breaks), "a break after the kill", within_s=4 * RTSP_READ_S)
    gap = run.breaks[0]
    assert not gap.final
    await run.until(lambda: run.metric("streamd_stream_up") == 0, "stream_up 0")
    # The marker goes into the ring just before the state changes: poll, do not race.
    await run.until(lambda: run.state() is SourceState.RECONNECTING, "state RECONNECTING")
    assert run.metric("streamd_reconnects_total") == 0

    await asyncio.to_thread(server.restart)
    await run.until(lambda: len(frames_after(run, gap)) >= 5, "frames after the restart")
    assert run.metric("streamd_stream_up") == 1
    assert run.metric("streamd_reconnects_total") >= 1
    assert run.state() is SourceState.CONNECTED
    # Stream time and frame numbers run on across the reconnect.
    assert [f.index for f in run.frames] == list(range(len(run.frames)))
    pts = pts_of(run.frames)
    assert all(b > a for a, b in itertools.pairwise(pts))
    assert gap.end_s is not None
    assert frames_after(run, gap)[0].pts_s >= gap.end_s


@pytest.mark.rtsp
@pytest.mark.usefixtures("fast_backoff")
async def test_rtsp_hung_camera_is_noticed(
    rtsp_server: RtspServerFactory, start_source: StartSource
) -> None:
    server = rtsp_server(live=True, pattern="black")
    run = start_source(server.url, **rtsp_config(read_timeout_s=1))
    await run.until(lambda: len(run.frames) >= 3, "first frames")
    server.pause()
    took = await run.until(lambda: bool(run.breaks), "the hang to be noticed", within_s=6)
    assert took < 2 * RTSP_READ_S + 2.0, took
    assert not run.breaks[0].final
    assert run.breaks[0].error == "timed out"
    assert run.metric("streamd_stream_up") == 0
    await run.until(lambda: run.state() is SourceState.RECONNECTING, "state RECONNECTING")
    server.resume()
    await run.until(lambda: len(frames_after(run, run.breaks[0])) >= 3, "frames after resume")
    assert run.metric("streamd_stream_up") == 1


@pytest.mark.rtsp
@pytest.mark.usefixtures("fast_backoff")
async def test_rtsp_password_never_logged_nor_exported(
    rtsp_server: RtspServerFactory,
    start_source: StartSource,
    clips: ClipSet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = rtsp_server(file=clips.h264.path)
    url = f"rtsp://user:s3cret@127.0.0.1:{server.port}/live"  # the server ignores auth
    run = start_source(url, **rtsp_config())
    await run.until(lambda: len(run.frames) >= 3, "frames")
    server.kill()  # lost, then "cannot open ...: Connection refused" with the URL in it
    await run.until(
        lambda: any((b.error or "").startswith("cannot open") for b in run.breaks),
        "a failed reconnect",
    )
    run.stop()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "user:***@127.0.0.1" in logged
    assert "s3cret" not in logged
    assert all("s3cret" not in (b.error or "") for b in run.breaks)
    assert all("s3cret" not in detail for _, detail in run.states)
    exposition = generate_latest(run.registry).decode()
    assert "streamd_stream_up" in exposition
    assert "s3cret" not in exposition
    assert "127.0.0.1" not in exposition  # no URL in any label


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def late_camera() -> Iterator[RtspServer]:
    """A camera on a known port that is not started yet."""
    require_rtsp()
    server = RtspServer(live=True, port=free_port())
    yield server
    server.close()


@pytest.mark.rtsp
@pytest.mark.usefixtures("fast_backoff")
async def test_rtsp_dead_camera_at_start_keeps_trying(
    late_camera: RtspServer, start_source: StartSource
) -> None:
    url = f"rtsp://127.0.0.1:{late_camera.port}/live"
    run = start_source(url, **rtsp_config())
    await run.until(lambda: len(run.breaks) >= 3, "several failed attempts")
    assert run.state() is SourceState.RECONNECTING
    assert run.metric("streamd_stream_up") == 0
    assert run.frames == []
    assert not any(b.final for b in run.breaks)
    assert all((b.error or "").startswith("cannot open") for b in run.breaks)

    await asyncio.to_thread(late_camera.start)
    assert late_camera.url == url
    await run.until(lambda: len(run.frames) >= 3, "frames once the camera is up")
    assert run.state() is SourceState.CONNECTED
    assert run.metric("streamd_stream_up") == 1


# --- pure -----------------------------------------------------------------------------------


def test_backoff_delay_is_capped_full_jitter() -> None:
    rng = random.Random(1234)
    base, cap = streamd.backoff.BACKOFF_BASE_S, streamd.backoff.BACKOFF_CAP_S
    means = []
    for attempt in range(12):
        samples = [backoff_delay(attempt, rng) for _ in range(400)]
        ceiling = min(cap, base * 2**attempt)
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.9 * ceiling  # full jitter: the whole range is used
        means.append(statistics.fmean(samples))
    growing = means[: next(i for i in range(12) if base * 2**i >= cap)]
    assert all(b > a for a, b in itertools.pairwise(growing)), means
    assert means[-1] == pytest.approx(cap / 2, rel=0.15)
    assert all(0 <= backoff_delay(attempt, rng) <= cap for attempt in (100, 10_000))


@pytest.mark.parametrize(
    ("url", "fmt", "options"),
    [
        (
            "rtsp://user:pw@cam.local:554/stream1",
            None,
            {"rtsp_transport": "tcp", "timeout": "2500000", "analyzeduration": "500000"},
        ),
        (
            "rtsps://cam.local/stream1",
            None,
            {"rtsp_transport": "tcp", "timeout": "2500000", "analyzeduration": "500000"},
        ),
        ("/dev/video0", "v4l2", {}),
        ("/videos/match.mp4", None, {}),
        ("file:///videos/match.mp4", None, {}),
        ("https://cdn.example/live/index.m3u8", None, {}),
    ],
)
def test_open_options(url: str, fmt: str | None, options: dict[str, str]) -> None:
    assert open_options(url, 2.5) == (fmt, options)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("rtsp://admin:hunter2@cam.local:554/s1", "rtsp://admin:***@cam.local:554/s1"),
        ("rtsps://u:p%40ss@10.0.0.2/live", "rtsps://u:***@10.0.0.2/live"),
        (
            "https://cdn.example/live.m3u8?token=abc123&quality=hd",
            "https://cdn.example/live.m3u8?token=***&quality=hd",
        ),
        ("http://h/x.m3u8?a=1&Signature=zz", "http://h/x.m3u8?a=1&Signature=***"),
        ("rtsp://cam.local:554/stream1", "rtsp://cam.local:554/stream1"),
        ("/videos/match.mp4", "/videos/match.mp4"),
        ("/dev/video0", "/dev/video0"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
