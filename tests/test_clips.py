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
from typing import IO, TYPE_CHECKING

import av
import av.error
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from streamd.config import StreamConfig
from streamd.domain import Frame
from streamd.ingest import PyAVSource, SourceItem, is_marker
from streamd.metrics import Metrics
from streamd.ring import FrameRing, Overflow, RingClosed
from streamd.sampling import Timeline
from streamd.store.clips import QUEUE_PACKETS, ClipRecorder
from tests.media import AnyPacket, ClipInfo, ClipSet, Segment, write_clip

if TYPE_CHECKING:  # conftest imports torch: keep it out of the recorder child (kill -9 test)
    from tests.conftest import RtspServerFactory

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

    registry: CollectorRegistry
    done: list[tuple[str, Path, int, bool]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    recorder: ClipRecorder = field(init=False)

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

    def make(clips_dir: Path | None = None, *, start: bool = True, **kwargs: float) -> Recording:
        registry = CollectorRegistry()
        rec = Recording(registry)
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
        if start:
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


def packets_of(path: Path, kind: str = "video") -> list[AnyPacket]:
    with av.open(str(path)) as container:
        stream = container.streams.get(**{kind: 0})[0]
        return [p for p in container.demux(stream) if p.size]


def time_of(packet: AnyPacket) -> float:
    assert packet.pts is not None
    return float(packet.pts * packet.time_base)


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
    source: PyAVSource,
    ring: FrameRing[SourceItem],
    on_frame: Callable[[Frame], bool],
    within_s: float = WAIT_S,
) -> list[Frame]:
    """Run the source, handing each frame to ``on_frame`` (on the loop) until it returns True."""
    frames: list[Frame] = []
    source.start()
    try:
        async with asyncio.timeout(within_s):
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


def scripted(steps: list[tuple[float, Callable[[], object]]]) -> Callable[[float], bool]:
    """Run each step once stream time reaches its time; True once all have run."""

    def at(time_s: float) -> bool:
        while steps and time_s >= steps[0][0] - 1e-6:
            steps.pop(0)[1]()
        return not steps

    return at


async def test_file_event_clip_is_the_source_packets_of_the_event_span(
    recording: Callable[..., Recording], media: dict[str, ClipInfo], tmp_path: Path
) -> None:
    clip = media["av"]
    rec = recording(pre_roll_s=1.0, post_roll_s=1.0)
    source, ring = new_source(str(clip.path), rec)
    event = event_id(1)
    recorder = rec.recorder
    # As the pipeline does: an event is begun, extended and ended after its frames went by.
    at = scripted(
        [
            (4.0, lambda: recorder.begin(event, 3.0)),
            (5.0, lambda: recorder.extend(event, 4.5)),
            (5.5, lambda: recorder.end(event, 5.0)),
        ]
    )
    frames = await take_frames(source, ring, lambda frame: at(frame.pts_s) and False)
    assert len(frames) == clip.frame_count
    ((name, path, size, complete),) = await asyncio.to_thread(rec.wait_done, 1)
    assert (name, complete) == (event, True)
    assert path == tmp_path / "clips" / f"{event}.mp4"
    assert size == path.stat().st_size
    # Remuxed, not re-encoded: the very packets of the source, from the keyframe at
    # 3.0 - 1.0 = 2 s to the post-roll's end at 5.0 + 1.0 = 6 s, with the same codec setup.
    out = packets_of(path)
    assert out[0].is_keyframe
    assert [bytes(p) for p in out] == [bytes(p) for p in packets_of(clip.path)[20:60]]
    assert codec_facts(path) == codec_facts(clip.path)
    times = decoded_times(path)
    assert len(times) == 40
    assert times[0] == pytest.approx(0.0, abs=1e-3)
    span_s = (5.0 - 3.0) + 1.0 + 1.0
    assert abs(times[-1] + 1 / clip.fps - span_s) <= 1.0 + 1 / clip.fps  # a GOP and a frame
    # Audio kept, the same packets, in sync: clip time 0 is source time 2.0.
    with av.open(str(path)) as container:
        (audio,) = container.streams.audio
        assert (audio.codec_context.name, audio.sample_rate) == ("aac", 16_000)
    source_audio: dict[bytes, list[float]] = {}
    for p in packets_of(clip.path, "audio"):
        source_audio.setdefault(bytes(p), []).append(time_of(p))
    out_audio = packets_of(path, "audio")
    assert len(out_audio) >= 4.0 * 16_000 / 1024 - 2
    for p in out_audio:
        when = time_of(p) + 2.0
        assert any(abs(when - t) < 1e-3 for t in source_audio[bytes(p)])
    assert rec.metric("streamd_clips_total") == 1
    assert rec.metric("streamd_clip_ring_bytes") > 0


async def test_full_frames_carry_a_jpeg_at_the_source_size(media: dict[str, ClipInfo]) -> None:
    clip = media["wide"]
    source, ring = new_source(str(clip.path), None, full_frames=True, sample_fps=1)
    frames = await take_frames(source, ring, lambda _frame: False)
    assert len(frames) == 8
    for frame in frames:
        assert frame.image.shape == (INPUT_SIZE[1], INPUT_SIZE[0], 3)
        assert frame.source_jpeg is not None
        picture = Image.open(io.BytesIO(frame.source_jpeg))
        assert (picture.format, picture.size) == ("JPEG", (clip.width, clip.height))
    plain, ring = new_source(str(clip.path), None, sample_fps=1)
    assert all(f.source_jpeg is None for f in await take_frames(plain, ring, lambda _f: False))


def record_until_killed(url: str, clips_dir: str) -> None:
    """The child of test_a_clip_survives_kill_9: a camera at 1x, an event that never ends."""
    asyncio.run(_record_forever(url, Path(clips_dir)))


async def _record_forever(url: str, clips_dir: Path) -> None:
    recorder = ClipRecorder(STREAM, clips_dir, 1.0, 1.0, Metrics(CollectorRegistry()))
    recorder.start()
    rec = Recording(CollectorRegistry())
    rec.recorder = recorder
    source, ring = new_source(url, rec, live=True)

    def on_frame(frame: Frame) -> bool:
        if frame.index == 0:
            print(recorder.begin(event_id(2), frame.pts_s), flush=True)  # noqa: T201
        recorder.extend(event_id(2), frame.pts_s)
        print(f"{frame.pts_s:.2f}", flush=True)  # noqa: T201
        return False

    await take_frames(source, ring, on_frame, within_s=60.0)


def test_a_clip_survives_kill_9(media: dict[str, ClipInfo], tmp_path: Path) -> None:
    clips_dir = tmp_path / "clips"
    child = record_until_killed.__name__
    args = f"{str(media['av'].path)!r}, {str(clips_dir)!r}"
    code = f"from tests.test_clips import {child}; {child}({args})"
    stderr = tmp_path / "child.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True
        )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read(out: IO[str]) -> None:
        for line in out:
            lines.put(line.strip())

    reader = threading.Thread(target=read, args=(proc.stdout,), name="child-stdout")
    reader.start()
    try:
        path = Path(lines.get(timeout=WAIT_S))
        while float(lines.get(timeout=WAIT_S)) < 2.5:  # 1x: about 2.5 s from now
            pass
    except queue.Empty:
        pytest.fail(f"the recorder child stalled:\n{stderr.read_text()}")
    finally:
        proc.kill()
        proc.wait(timeout=5)
        reader.join(timeout=5)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert path == clips_dir / f"{event_id(2)}.mp4"
    assert packets_of(path)[0].is_keyframe
    times = decoded_times(path)  # up to the last fragment that reached the file
    assert len(times) >= 10
    assert times[-1] >= 0.9


@pytest.mark.rtsp
async def test_rtsp_clip_keeps_the_camera_codec(
    rtsp_server: RtspServerFactory,
    clips: ClipSet,
    recording: Callable[..., Recording],
) -> None:
    server = rtsp_server(file=clips.h264.path)
    rec = recording(pre_roll_s=0.5, post_roll_s=0.5)
    source, ring = new_source(server.url, rec, read_timeout_s=1.0, open_timeout_s=3.0)
    event, recorder = event_id(3), rec.recorder
    origin: list[float] = []
    steps: list[tuple[float, Callable[[], object]]] = [
        (2.0, lambda: recorder.begin(event, origin[0] + 1.5)),
        (3.5, lambda: recorder.end(event, origin[0] + 3.0)),
        (4.0, lambda: None),  # the post-roll has gone by: stop the camera
    ]
    at = scripted(steps)

    def on_frame(frame: Frame) -> bool:
        origin[:] = origin or [frame.pts_s]
        return at(frame.pts_s - origin[0])

    await take_frames(source, ring, on_frame)
    ((name, path, _size, complete),) = await asyncio.to_thread(rec.wait_done, 1)
    assert (name, complete) == (event, True)
    codec, width, height, extradata = codec_facts(path)
    assert (codec, width, height) == ("h264", 64, 48)
    # The camera's SPS and PPS, as the file it serves has them (avcC: ... len, SPS, 1, len, PPS).
    avcc = codec_facts(clips.h264.path)[3]
    assert avcc is not None
    assert extradata is not None
    sps_len = int.from_bytes(avcc[6:8], "big")
    sps, pps = avcc[8 : 8 + sps_len], avcc[11 + sps_len :]
    assert sps in extradata
    assert pps in extradata
    out = packets_of(path)
    assert out[0].is_keyframe
    served = {bytes(p) for p in packets_of(clips.h264.path)}
    assert all(bytes(p) in served for p in out if not p.is_keyframe)  # not re-encoded
    assert 20 <= len(decoded_times(path)) <= 36  # 2.5 s, give or take a GOP and a frame


# --- the recorder, driven from a demux loop --------------------------------------------------


def test_ring_is_bounded_by_bytes(
    recording: Callable[..., Recording], media: dict[str, ClipInfo], tmp_path: Path
) -> None:
    clip = media["av"]
    total = sum(p.size for kind in ("video", "audio") for p in packets_of(clip.path, kind))
    limit = total // 4  # about 2 s of the 8
    small = recording(pre_roll_s=5.0, post_roll_s=0.0, max_ring_bytes=limit)
    big = recording(tmp_path / "big", pre_roll_s=5.0, post_roll_s=0.0)
    for rec in (small, big):
        feed(rec.recorder, clip.path)
        rec.recorder.begin(event_id(4), 7.0)  # the pre-roll asks for 2.0 s on
        rec.recorder.end(event_id(4), 7.5)
    ((_, small_path, _, small_complete),) = small.wait_done(1)
    ((_, big_path, _, big_complete),) = big.wait_done(1)
    assert small_complete
    assert big_complete
    dropped = small.metric("streamd_clip_packets_dropped_total", reason="ring_bytes")
    assert dropped > 0
    assert 0 < small.metric("streamd_clip_ring_bytes") <= limit
    assert big.metric("streamd_clip_packets_dropped_total", reason="ring_bytes") == 0
    assert big.metric("streamd_clip_ring_bytes") == total  # 8 s is within the time bound
    assert len(packets_of(big_path)) == 55  # 2.0 to 7.5 s
    cut = packets_of(small_path)  # from the oldest keyframe the byte bound left
    assert cut[0].is_keyframe
    assert 0 < len(cut) < 55


def test_a_full_queue_drops_and_counts(
    recording: Callable[..., Recording], media: dict[str, ClipInfo]
) -> None:
    clip = media["av"]
    rec = recording(start=False, post_roll_s=0.0)  # no thread takes from the queue yet
    per_feed = len(packets_of(clip.path)) + len(packets_of(clip.path, "audio"))
    feeds = QUEUE_PACKETS // per_feed + 2
    for n in range(feeds):
        feed(rec.recorder, clip.path, base_s=10.0 * n)
    dropped = rec.metric("streamd_clip_packets_dropped_total", reason="queue_full")
    assert dropped == feeds * per_feed - QUEUE_PACKETS
    rec.recorder.start()
    last = 10.0 * feeds
    feed(rec.recorder, clip.path, base_s=last)  # the recorder catches up, clips are written
    rec.recorder.begin(event_id(15), last + 3.0)
    rec.recorder.end(event_id(15), last + 4.0)
    ((_, path, _, complete),) = rec.wait_done(1)
    assert complete
    assert len(decoded_times(path)) == 20


def test_clip_runs_on_across_a_reconnect_with_the_same_codec(
    recording: Callable[..., Recording], media: dict[str, ClipInfo]
) -> None:
    rec, event = recording(pre_roll_s=0.0, post_roll_s=0.0), event_id(5)
    rec.recorder.begin(event, 6.0)
    rec.recorder.extend(event, 8.0)
    feed(rec.recorder, media["av"].path)  # stream time 0-8 s
    rec.recorder.on_disconnect()
    feed(rec.recorder, media["av"].path, base_s=10.0)  # back after 2 s: 10-18 s
    rec.recorder.end(event, 12.0)
    ((_, path, _, complete),) = rec.wait_done(1)
    assert complete
    times = decoded_times(path)
    assert len(times) == 40  # 6-8 s and 10-12 s
    assert times[20] - times[19] == pytest.approx(2.1, abs=1e-3)  # the gap, kept
    assert len(packets_of(path, "audio")) > 0


def test_new_codec_parameters_end_the_clip(
    recording: Callable[..., Recording], media: dict[str, ClipInfo]
) -> None:
    rec, event = recording(pre_roll_s=0.0, post_roll_s=0.0), event_id(6)
    rec.recorder.begin(event, 6.0)
    rec.recorder.extend(event, 20.0)
    feed(rec.recorder, media["av"].path)
    feed(rec.recorder, media["wide"].path, base_s=10.0)  # the camera now sends another size
    ((_, path, _, complete),) = rec.wait_done(1)
    assert not complete
    assert len(decoded_times(path)) == 20
    assert codec_facts(path)[1:3] == (64, 48)
    rec.recorder.extend(event, 21.0)  # the event goes on; its clip has ended: ignored
    rec.recorder.end(event, 22.0)


def test_close_cuts_open_clips_short(
    recording: Callable[..., Recording], media: dict[str, ClipInfo]
) -> None:
    rec, event = recording(), event_id(7)
    rec.recorder.begin(event, 2.0)
    rec.recorder.extend(event, 5.0)
    feed(rec.recorder, media["av"].path)
    rec.recorder.close(WAIT_S)
    ((_, path, size, complete),) = rec.wait_done(1)
    assert not complete
    assert size == path.stat().st_size
    assert len(decoded_times(path)) == 50  # 1.0 (keyframe before 2.0 - 1.0) to 6.0


def test_only_event_ids_name_clips(recording: Callable[..., Recording], tmp_path: Path) -> None:
    recorder = recording().recorder
    bad = ("../../etc/passwd", "1764012345.1-Cam-1", "1764012345.1-cam-1.mp4", "x", "1.2-a-3\n")
    for event in bad:
        with pytest.raises(ValueError, match="not an event id"):
            recorder.begin(event, 0.0)
        recorder.extend(event, 1.0)  # unknown ids: never an error
        recorder.end(event, 1.0)
    assert recorder.begin(event_id(8), 0.0) == tmp_path / "clips" / f"{event_id(8)}.mp4"


def clip_error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamd.store.clips" and r.levelno >= logging.ERROR
    ]


def test_unwritable_clips_dir_is_counted_and_survived(
    recording: Callable[..., Recording],
    media: dict[str, ClipInfo],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")  # root can write anywhere, but not under a regular file
    rec = recording(blocker / "clips", post_roll_s=0.0)
    feed(rec.recorder, media["av"].path)
    for n in (9, 10):
        rec.recorder.begin(event_id(n), 3.0)
        rec.recorder.end(event_id(n), 4.0)
    done = rec.wait_done(2)
    assert [(e, size, complete) for e, _, size, complete in done] == [
        (event_id(9), 0, False),
        (event_id(10), 0, False),
    ]
    assert rec.metric("streamd_clip_errors_total", reason="not_writable") == 2
    lines = clip_error_lines(caplog)
    assert len(lines) == 2
    assert event_id(9) in lines[0]
    assert rec.metric("streamd_clip_ring_bytes") > 0  # the ring goes on


def test_disk_full_stops_that_clip_and_the_next_one_is_written(
    recording: Callable[..., Recording],
    media: dict[str, ClipInfo],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    clips_dir = tmp_path / "clips"
    clips_dir.mkdir()
    (clips_dir / f"{event_id(11)}.mp4").symlink_to("/dev/full")  # every write: ENOSPC
    rec = recording(clips_dir, post_roll_s=0.0)
    feed(rec.recorder, media["av"].path)
    for n in (11, 12):
        rec.recorder.begin(event_id(n), 3.0)
        rec.recorder.end(event_id(n), 4.0)
    (full, written) = rec.wait_done(2)
    assert (full[0], full[3]) == (event_id(11), False)
    assert (written[0], written[3]) == (event_id(12), True)
    assert rec.metric("streamd_clip_errors_total", reason="no_space") == 1
    assert rec.metric("streamd_clips_total") == 1
    (line,) = clip_error_lines(caplog)
    assert event_id(11) in line
    assert len(decoded_times(written[1])) == 20  # 2.0 to 4.0 s


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 KiB tmpfs (root with CAP_SYS_ADMIN only)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    command = ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    for _ in range(50):  # the recorder may still hold the file for a moment
        if subprocess.run(["umount", str(mount_point)], check=False).returncode == 0:
            break
        time.sleep(0.1)


def test_disk_full_mid_clip_keeps_the_part_written(
    tiny_disk: Path,
    recording: Callable[..., Recording],
    media: dict[str, ClipInfo],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = recording(tiny_disk, pre_roll_s=0.0, post_roll_s=0.0)
    rec.recorder.begin(event_id(13), 0.0)
    rec.recorder.extend(event_id(13), 100.0)  # every packet is due as soon as it arrives
    feed(rec.recorder, media["noise"].path)  # 4 s at ~27 KB/s: the disk fills mid-clip
    ((event, path, size, complete),) = rec.wait_done(1)
    assert (event, complete) == (event_id(13), False)
    assert size > 0
    assert len(decoded_times(path)) >= 10  # the fragments that fitted still play
    assert rec.metric("streamd_clip_errors_total", reason="no_space") == 1
    assert len(clip_error_lines(caplog)) == 1
    path.unlink()  # space freed (as retention would): the stream's next clip is written
    feed(rec.recorder, media["av"].path, base_s=10.0)
    rec.recorder.begin(event_id(14), 12.0)
    rec.recorder.end(event_id(14), 13.0)
    (_, (_, next_path, _, next_complete)) = rec.wait_done(2)
    assert next_complete
    assert len(decoded_times(next_path)) == 10
