"""Scripted test clips encoded with PyAV (no ffmpeg CLI): exact frame counts and timestamps."""

from __future__ import annotations

import functools
import math
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, TypeAlias

import av
import numpy as np
import numpy.typing as npt

SegmentKind = Literal["black", "white", "gray", "bars", "noise", "flash"]
Codec = Literal["mpeg4", "libx264"]

_STATIC_LEVEL = {"black": 0, "white": 255, "gray": 128}
_BAR_PERIOD_PX = 16
_BAR_STEP_PX = 4  # bars move this far each frame: strong, steady motion
_AUDIO_RATE = 16_000
_AUDIO_TONE_HZ = 440.0
AnyPacket: TypeAlias = "av.Packet[av.stream.Stream]"
_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".ts": "mpegts"}


@dataclass(frozen=True, slots=True)
class Segment:
    duration_s: float
    kind: SegmentKind


@dataclass(frozen=True, slots=True)
class ClipInfo:
    path: Path
    duration_s: float
    fps: int
    frame_count: int
    width: int
    height: int
    segments: tuple[Segment, ...] = ()

    def segment_bounds(self) -> list[tuple[float, float, SegmentKind]]:
        """(start_s, end_s, kind) of each segment, in presentation time."""
        out: list[tuple[float, float, SegmentKind]] = []
        start = 0
        for seg in self.segments:
            n = segment_frames(seg, self.fps)
            out.append((start / self.fps, (start + n) / self.fps, seg.kind))
            start += n
        return out


def segment_frames(segment: Segment, fps: int) -> int:
    return round(segment.duration_s * fps)


def render_frames(
    segments: Sequence[Segment], width: int, height: int, fps: int, *, seed: int = 0
) -> Iterator[npt.NDArray[np.uint8]]:
    """Yield RGB24 frames (height, width, 3) for a script of segments."""
    rng = np.random.default_rng(seed)
    x = np.arange(width)
    for seg in segments:
        n = segment_frames(seg, fps)
        for i in range(n):
            if seg.kind in _STATIC_LEVEL:
                yield np.full((height, width, 3), _STATIC_LEVEL[seg.kind], np.uint8)
            elif seg.kind == "flash":
                yield np.full((height, width, 3), 255 * (i % 2), np.uint8)
            elif seg.kind == "bars":
                lit = ((x + i * _BAR_STEP_PX) // (_BAR_PERIOD_PX // 2)) % 2 == 0
                row = np.where(lit, 255, 0).astype(np.uint8)
                yield np.broadcast_to(row[None, :, None], (height, width, 3)).copy()
            elif seg.kind == "noise":
                yield rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:  # pragma: no cover - Literal guards this
                raise ValueError(f"unknown segment kind {seg.kind!r}")


@dataclass(frozen=True, slots=True)
class _VideoSpec:
    width: int
    height: int
    fps: int
    codec: Codec
    gop: int | None
    seed: int


def rgb_to_yuv420p(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """BT.601 limited-range RGB -> planar yuv420p, shaped (h * 3 // 2, w) for from_ndarray.

    Numpy is faster than a per-frame swscale context at these tiny sizes.
    """
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h, w = r.shape
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = np.clip(np.rint(y), 0, 255)
    for i, plane in enumerate((u, v)):
        sub = plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        out[h + i * h // 4 : h + (i + 1) * h // 4] = np.clip(np.rint(sub), 0, 255).reshape(-1, w)
    return out


def _add_video_stream(container: av.container.OutputContainer, spec: _VideoSpec) -> av.VideoStream:
    if spec.codec == "libx264" and (spec.width % 2 or spec.height % 2):
        raise ValueError("libx264 with yuv420p needs even width and height")
    # No B-frames: decode order == presentation order, so pts are i/fps from frame 0.
    options = {"bf": "0"}
    if spec.codec == "mpeg4" and spec.gop is not None:
        options["sc_threshold"] = "1000000000"  # no extra I-frames at scene changes
    if spec.codec == "libx264":
        # One thread: the bitstream is then identical on every machine (corrupt_file tests).
        options |= {"preset": "ultrafast", "threads": "1"}
        if spec.gop is not None:
            # min-keyint = keyint and no scene-cut IDRs: the keyframe interval is exact.
            options["x264-params"] = f"keyint={spec.gop}:min-keyint={spec.gop}:scenecut=0"
    stream = container.add_stream(spec.codec, rate=spec.fps, options=options)
    stream.width = spec.width
    stream.height = spec.height
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = Fraction(1, spec.fps)
    if spec.gop is not None:
        stream.codec_context.gop_size = spec.gop
    return stream


def _encode_audio(container: av.container.OutputContainer, duration_s: float) -> list[AnyPacket]:
    """Encode a sine tone; the caller muxes the packets interleaved with the video."""
    if container.format.name == "mpegts":
        stream = container.add_stream("mp2", rate=_AUDIO_RATE, layout="mono")
    else:
        stream = container.add_stream("aac", rate=_AUDIO_RATE, layout="mono")
    stream.codec_context.time_base = Fraction(1, _AUDIO_RATE)
    frame_size = stream.codec_context.frame_size or 1024
    total = round(duration_s * _AUDIO_RATE)
    t = np.arange(total, dtype=np.float32) / _AUDIO_RATE
    wave = (0.3 * np.sin(2 * math.pi * _AUDIO_TONE_HZ * t)).astype(np.float32)
    packets: list[AnyPacket] = []
    for start in range(0, total, frame_size):
        chunk = wave[start : start + frame_size]
        if chunk.shape[0] < frame_size:  # fixed-frame-size encoders need full frames
            chunk = np.pad(chunk, (0, frame_size - chunk.shape[0]))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = _AUDIO_RATE
        frame.pts = start
        frame.time_base = Fraction(1, _AUDIO_RATE)
        packets.extend(stream.encode(frame))
    packets.extend(stream.encode(None))
    # Encoder priming makes the first audio pts negative. MPEG-TS has no edit list, so the
    # muxer would shift every stream (video too) to compensate; start the audio at 0 instead.
    first = packets[0].pts if packets else None
    if container.format.name == "mpegts" and first is not None and first < 0:
        for packet in packets:
            if packet.pts is not None:
                packet.pts -= first
            if packet.dts is not None:
                packet.dts -= first
    return packets


def write_clip(
    path: Path | str,
    segments: Sequence[Segment],
    *,
    width: int = 64,
    height: int = 48,
    fps: int = 10,
    codec: Codec = "mpeg4",
    audio: bool = False,
    gop: int | None = None,
    seed: int = 0,
) -> ClipInfo:
    """Encode a scripted clip; frame i has pts i in time base 1/fps (time i/fps)."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix)
    if fmt is None:
        raise ValueError(f"unsupported container suffix {path.suffix!r}")
    spec = _VideoSpec(width, height, fps, codec, gop, seed)
    with av.open(str(path), "w", format=fmt) as container:
        frame_count = _encode(container, segments, spec, audio=audio)
    return ClipInfo(path, frame_count / fps, fps, frame_count, width, height, tuple(segments))


def _encode(
    container: av.container.OutputContainer,
    segments: Sequence[Segment],
    spec: _VideoSpec,
    *,
    audio: bool,
) -> int:
    stream = _add_video_stream(container, spec)
    total_frames = sum(segment_frames(s, spec.fps) for s in segments)
    audio_packets = _encode_audio(container, total_frames / spec.fps) if audio else []
    pending = iter(audio_packets)
    next_audio = next(pending, None)
    frames = render_frames(segments, spec.width, spec.height, spec.fps, seed=spec.seed)
    for index, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
        frame.pts = index
        frame.time_base = Fraction(1, spec.fps)
        container.mux(stream.encode(frame))
        while next_audio is not None and _packet_time(next_audio) <= index / spec.fps:
            container.mux(next_audio)
            next_audio = next(pending, None)
    container.mux(stream.encode(None))
    container.mux(([next_audio] if next_audio is not None else []) + list(pending))
    return total_frames


def _packet_time(packet: AnyPacket) -> float:
    if packet.pts is None or packet.time_base is None:
        return 0.0
    return float(packet.pts * packet.time_base)


def write_hls(
    directory: Path | str,
    segments: Sequence[Segment],
    *,
    width: int = 64,
    height: int = 48,
    fps: int = 10,
    hls_time_s: int = 2,
    codec: Codec = "libx264",
    seed: int = 0,
) -> Path:
    """Write a VOD HLS playlist (`index.m3u8`) plus .ts segments; returns the playlist path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    playlist = directory / "index.m3u8"
    options = {
        "hls_time": str(hls_time_s),
        "hls_list_size": "0",
        "hls_playlist_type": "vod",
        "hls_segment_filename": str(directory / "seg%03d.ts"),
    }
    with av.open(str(playlist), "w", format="hls", options=options) as container:
        # A keyframe at every segment boundary, so segments are exactly hls_time_s long.
        spec = _VideoSpec(width, height, fps, codec, hls_time_s * fps, seed)
        _encode(container, segments, spec, audio=False)
    return playlist


def truncate_file(src: Path | str, dst: Path | str, fraction: float) -> Path:
    """Copy the first `fraction` of src's bytes to dst: a file cut off mid-write."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def corrupt_file(
    src: Path | str, dst: Path | str, offset_fraction: float, length: int, *, seed: int = 0
) -> Path:
    """Copy src to dst and overwrite `length` bytes at `offset_fraction` with random bytes."""
    dst = Path(dst)
    shutil.copyfile(src, dst)
    data = bytearray(dst.read_bytes())
    start = int(len(data) * offset_fraction)
    end = min(len(data), start + length)
    data[start:end] = random.Random(seed).randbytes(end - start)
    dst.write_bytes(bytes(data))
    return dst


class ClipSet:
    """The session's clips (64x48, 10 fps), each written on first access.

    Scripts are in each ClipInfo's `segments`; `segment_bounds()` gives exact times.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root

    @functools.cached_property
    def static(self) -> ClipInfo:
        """Black, 6 s."""
        return write_clip(self.root / "static.mp4", [Segment(6, "black")])

    @functools.cached_property
    def motion(self) -> ClipInfo:
        """Moving bars, 6 s."""
        return write_clip(self.root / "motion.mp4", [Segment(6, "bars")])

    @functools.cached_property
    def scenecut(self) -> ClipInfo:
        """Black 4 s, then white 4 s."""
        return write_clip(self.root / "scenecut.mp4", [Segment(4, "black"), Segment(4, "white")])

    @functools.cached_property
    def activity(self) -> ClipInfo:
        """Black 6 s, bars 4 s (t = 6..10 s), black 6 s."""
        script = [Segment(6, "black"), Segment(4, "bars"), Segment(6, "black")]
        return write_clip(self.root / "activity.mp4", script)

    @functools.cached_property
    def with_audio(self) -> ClipInfo:
        """Bars 4 s plus a 440 Hz AAC tone of the same length."""
        return write_clip(self.root / "with_audio.mp4", [Segment(4, "bars")], audio=True)

    @functools.cached_property
    def h264(self) -> ClipInfo:
        """libx264 bars 10 s, a keyframe every 10 frames: what the RTSP server serves."""
        return write_clip(self.root / "h264.mp4", [Segment(10, "bars")], codec="libx264", gop=10)

    @functools.cached_property
    def h264_mkv(self) -> ClipInfo:
        """The same as `h264`, in Matroska (streamable: a cut copy still opens)."""
        return write_clip(self.root / "h264.mkv", [Segment(10, "bars")], codec="libx264", gop=10)

    @functools.cached_property
    def long(self) -> ClipInfo:
        """60 s: black 10, bars 5 (10..15 s), black 15, noise 10 (30..40 s), black 20."""
        script = [
            Segment(10, "black"),
            Segment(5, "bars"),
            Segment(15, "black"),
            Segment(10, "noise"),
            Segment(20, "black"),
        ]
        return write_clip(self.root / "long.mp4", script)

    @functools.cached_property
    def truncated(self) -> Path:
        """`h264_mkv` cut at 50%: opens, decodes the first 38 of 100 frames, ends normally."""
        return truncate_file(self.h264_mkv.path, self.root / "truncated.mkv", 0.5)

    @functools.cached_property
    def truncated_mp4(self) -> Path:
        """`h264` cut at 50%: the moov atom is lost, so av.open raises InvalidDataError."""
        return truncate_file(self.h264.path, self.root / "truncated.mp4", 0.5)

    @functools.cached_property
    def corrupt(self) -> Path:
        """`h264` with 64 random bytes at 50%: decoding raises InvalidDataError mid-file."""
        return corrupt_file(self.h264.path, self.root / "corrupt.mp4", 0.5, 64)

    @functools.cached_property
    def hls(self) -> Path:
        """A VOD playlist (2 s .ts segments) of black 3 s then bars 4 s; 70 frames."""
        return write_hls(self.root / "hls", [Segment(3, "black"), Segment(4, "bars")])
