"""Event clips: real PyAV demuxing (files, a GStreamer RTSP camera), real files on disk, no mocks.

Most tests drive a ClipRecorder from a real demux loop (`feed`, what PyAVSource does with a
recorder, minus decoding); the end-to-end ones run it behind a real PyAVSource.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import av.error
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from streamd.clips import ClipRecorder
from streamd.config import StreamConfig
from streamd.domain import Frame
from streamd.ingest import PyAVSource, SourceItem, is_marker
from streamd.metrics import Metrics
from streamd.ring import FrameRing, Overflow, RingClosed
from streamd.sampling import Timeline
from tests.conftest import RtspServerFactory
from tests.media import ClipInfo, ClipSet, Segment, write_clip

STREAM = "cam"
INPUT_SIZE = (32, 24)
WAIT_S = 15.0
REPO = Path(__file__).resolve().parents[1]


def event_id(n: int) -> str:
    return f"1764012345.123456-{STREAM}-{n}"


# --- harness --------------------------------------------------------------------------------


@dataclass
class Recording:
    """A recorder on a fresh registry, and every clip it finished."""

    recorder: ClipRecorder
    registry: CollectorRegistry
    done: list[tuple[str, Path, int, bool]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_done(self, event: str, path: Path, size: int, complete: bool) -> None:
        with self.cond:
            self.done.append((event, path, size, complete))
            self.cond.notify_all()

    def wait_done(self, count: int, within_s: float = WAIT_S) -> list[tuple[str, Path, int, bool]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.done) >= count, within_s), self.done
            return list(self.done)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"stream": STREAM, **labels}) or 0.0


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Callable[..., Recording]]:
    made: list[Recording] = []

    def make(clips_dir: Path | None = None, **kwargs: float) -> Recording:
        registry = CollectorRegistry()
        rec = Recording(None, registry)  # type: ignore[arg-type]
        options = {"pre_roll_s": 1.0, "post_roll_s": 1.0} | kwargs
        rec.recorder = ClipRecorder(
            STREAM,
            clips_dir or tmp_path / "clips",
            options.pop("pre_roll_s"),
            options.pop("post_roll_s"),
            Metrics(registry),
            on_done=rec.on_done,
            max_ring_bytes=int(options.pop("max_ring_bytes", 64 * 2**20)),
        )
        rec.recorder.start()
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.recorder.close(WAIT_S)


def feed(recorder: ClipRecorder, path: Path, base_s: float = 0.0) -> None:
    """One connection to a file, as PyAVSource makes it with a recorder (without decoding)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        recorder.on_connect(container, video, audio)
        origin = container.start_time / av.time_base if container.start_time is not None else None
        offset = Timeline(0.1, base_s=base_s, origin=origin).offset_s()
        assert offset is not None
        streams = (video,) if audio is None else (video, audio)
        for packet in container.demux(*streams):
            if packet.pts is not None:
                recorder.on_packet(packet, float(packet.pts * packet.time_base) + offset)


def packets_of(path: Path, kind: str = "video") -> list[av.Packet]:
    with av.open(str(path)) as container:
        stream = container.streams.get(**{kind: 0})[0]
        return [p for p in container.demux(stream) if p.size]


def decoded_times(path: Path) -> list[float]:
    """Times of the frames that decode, up to the first damage (a clip cut by a kill)."""
    times: list[float] = []
    with av.open(str(path)) as container, contextlib.suppress(av.error.FFmpegError):
        for frame in container.decode(video=0):
            assert frame.time is not None
            times.append(frame.time)
    return times


def codec_facts(path: Path) -> tuple[str, int, int, bytes | None]:
    with av.open(str(path)) as container:
        ctx = container.streams.video[0].codec_context
        return ctx.name, ctx.width, ctx.height, ctx.extradata


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClipInfo]:
    """H.264 with a keyframe every second; one with AAC, one of another size, one of noise."""
    root = tmp_path_factory.mktemp("clip-media")
    bars = [Segment(8, "bars")]
    return {
        "av": write_clip(root / "av.mp4", bars, codec="libx264", gop=10, audio=True),
        "wide": write_clip(root / "wide.mp4", bars, width=96, height=48, codec="libx264", gop=10),
        "noise": write_clip(root / "noise.mp4", [Segment(4, "noise")], codec="libx264", gop=10),
    }


# --- through a real PyAVSource ---------------------------------------------------------------


async def frames_of(source: PyAVSource, ring: FrameRing[SourceItem]) -> list[Frame]:
    """Start the source and take its frames (on the loop) until it ends."""
    frames: list[Frame] = []
    source.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    item = await ring.get()
                except RingClosed:
                    return frames
                if isinstance(item, Frame):
                    frames.append(item)
                    yield_point = frames[-1]
                    await on_frame(yield_point)
    finally:
        source.stop()
        assert source.join(WAIT_S)


async def on_frame(_frame: Frame) -> None:  # replaced per test through run_source
    return None


def new_source(
    url: str, rec: Recording | None, *, full_frames: bool = False, **config: object
) -> tuple[PyAVSource, FrameRing[SourceItem]]:
    ring: FrameRing[SourceItem] = FrameRing(
        maxsize=8,
        overflow=Overflow.WAIT,
        loop=asyncio.get_running_loop(),
        on_drop=lambda: None,
        is_marker=is_marker,
    )
    cfg = StreamConfig.model_validate({"name": STREAM, "url": url, "sample_fps": 10, **config})
    metrics = Metrics(CollectorRegistry()).for_stream(STREAM)
    recorder = rec.recorder if rec is not None else None
    source = PyAVSource(cfg, INPUT_SIZE, ring, metrics, recorder=recorder, full_frames=full_frames)
    return source, ring


async def take_frames(
    source: PyAVSource, ring: FrameRing[SourceItem], on_frame: Callable[[Frame], bool]
) -> list[Frame]:
    """Run the source, handing each frame to ``on_frame`` (on the loop) until it returns True."""
    frames: list[Frame] = []
    source.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    item = await ring.get()
                except RingClosed:
                    return frames
                if isinstance(item, Frame):
                    frames.append(item)
                    if on_frame(item):
                        return frames
    finally:
        source.stop()
        assert source.join(WAIT_S)
