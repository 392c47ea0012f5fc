"""Highlight reels: the chosen spans of a video, in time order, re-encoded with PyAV."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import av.container
import av.error
import av.video.frame
import av.video.stream

from streamd.errors import SourceError

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 15.0
CODECS = ("libx264", "mpeg4")
"""Preferred encoders: H.264 plays everywhere; mpeg4 where libx264 is missing."""


def plan_segments(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sort spans by time and merge overlapping ones (pure)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def check_reel_path(out_path: str) -> str | None:
    """What stops a reel being written to ``out_path``, in one line; None if nothing does.

    Opens a scratch file with the same suffix next to it: that proves the directory writable
    and that FFmpeg has a muxer for the suffix (``.mp4``, ``.mkv``, ``.mov``...), which must
    hold one of ``CODECS``. Nothing is left behind.
    """
    path = Path(out_path)
    suffix = path.suffix
    if not suffix:
        return f"{out_path}: no file extension to choose the container by (use .mp4)"
    try:
        with (
            tempfile.NamedTemporaryFile(dir=path.parent, prefix=".streamd-", suffix=suffix) as f,
            av.open(f.name, mode="w") as probe,
        ):
            codecs = probe.supported_codecs
    except ValueError:
        return f"{out_path}: FFmpeg has no container for {suffix!r} files (use .mp4, .mkv or .mov)"
    except (OSError, av.error.FFmpegError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        return f"{out_path}: cannot write there ({reason})"
    if not codecs.intersection(CODECS):
        return (
            f"{out_path}: a {suffix!r} file cannot hold the reel's video (use .mp4, .mkv or .mov)"
        )
    return None


def write_reel(source: str, spans: Sequence[tuple[float, float]], out_path: str) -> float:
    """Cut ``spans`` (stream seconds from the file's start) into one MP4; returns its length.

    Cuts are frame-exact because the video is re-encoded (stream copy could only cut at
    keyframes). Memory stays bounded: frames go from decoder to encoder one at a time.
    """
    segments = plan_segments(spans)
    try:
        source_container = av.open(source, timeout=(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S))
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(f"{source}: cannot open for the reel: {exc}") from exc
    with source_container as container:
        vstream = container.streams.video[0]
        rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
        origin = (container.start_time or 0) / av.time_base
        with av.open(out_path, mode="w") as output:
            ostream = _add_video_stream(output, vstream, rate)
            written = 0
            for start, end in segments:
                for frame in _frames_between(container, vstream, origin + start, origin + end):
                    out_frame = frame.reformat(
                        width=ostream.width, height=ostream.height, format="yuv420p"
                    )
                    out_frame.pts = written
                    out_frame.time_base = ostream.codec_context.time_base
                    output.mux(ostream.encode(out_frame))
                    written += 1
            output.mux(ostream.encode(None))
    duration = written / float(rate)
    logger.info("reel %s: %d segments, %.1fs", out_path, len(segments), duration)
    return duration


def _add_video_stream(
    output: av.container.OutputContainer, source: av.video.stream.VideoStream, rate: Fraction
) -> av.video.stream.VideoStream:
    # Encoders want even dimensions for 4:2:0.
    width, height = source.width - source.width % 2, source.height - source.height % 2
    last_error: Exception | None = None
    for codec in CODECS:
        try:
            stream = output.add_stream(codec, rate=rate)
        except (av.error.FFmpegError, ValueError) as exc:
            last_error = exc
            continue
        if not isinstance(stream, av.video.stream.VideoStream):  # pragma: no cover - PyAV typing
            raise SourceError(f"{codec} is not a video encoder")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1) / rate
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        else:
            stream.codec_context.bit_rate = 4_000_000
        return stream
    raise SourceError(f"no video encoder available ({last_error})")


def _frames_between(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    start: float,
    end: float,
) -> Iterator[av.video.frame.VideoFrame]:
    """Decoded frames with ``start <= time < end``: seek to the keyframe before, then decode."""
    assert stream.time_base is not None  # noqa: S101 - every demuxed stream has one
    container.seek(int(start / stream.time_base), stream=stream, backward=True)
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except (av.error.InvalidDataError, ValueError):
            continue  # a corrupt packet: a frame short, not a broken reel
        for frame in frames:
            if frame.time is None or frame.time < start - 1e-6:
                continue
            if frame.time >= end - 1e-6:
                return
            yield frame
