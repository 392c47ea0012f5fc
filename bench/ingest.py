"""Ingest benchmark: streamd's decode -> sample -> resize -> windows path against bare PyAV.

    python bench/ingest.py [--seconds 20] [--repeat 5]

Encodes (with PyAV, into a temporary directory; not timed) a 1080p and a 360p camera-like
H.264 clip (libx264, 25 fps, a keyframe every 2 s, no B-frames, moving texture plus sensor
noise), then times, for each clip at sample_fps 1 and 30, in the same run:

  a) streamd: PyAVSource -> FrameRing (WAIT) -> windows_from/Windower on an asyncio loop,
     frames resized to 512x512, every window consumed;
  b) bare PyAV: decode the file, resize the frames of the same 1/fps slots the same way
     (``to_ndarray(width=512, height=512, format="rgb24", interpolation="BICUBIC")``);
  c) ``ffmpeg -i F -f null -`` for reference (decode only; skipped if ffmpeg is missing).

Best of ``--repeat`` (5) runs each, a and b interleaved; wall seconds and CPU seconds (all
threads: steadier when the machine is shared). Goal: a/b <= 1.10.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from streamd.config import StreamConfig
from streamd.ingest import PyAVSource
from streamd.metrics import Metrics
from streamd.pipeline import frame_ring, windows_from
from streamd.window import Windower

FPS = 25
GOP = 2 * FPS
INPUT_SIZE = (512, 512)
SAMPLE_RATES = (1.0, 30.0)
WINDOW_S = 8.0
STRIDE_S = 4.0
GOAL = 1.10
_EPS = 1e-6
CLIPS = {"1080p": (1920, 1080), "360p": (640, 360)}


@dataclass(frozen=True, slots=True)
class Result:
    seconds: float  # wall clock
    cpu: float  # CPU seconds of the process (all threads) or of ffmpeg: steadier on a busy box
    decoded: int
    sampled: int
    windows: int = 0


@dataclass(frozen=True, slots=True)
class Row:
    clip: str
    fps: float
    a: Result
    b: Result
    c: Result | None
    paired: float  # median a/b over back-to-back pairs


# --- clips ----------------------------------------------------------------------------------


def write_camera_clip(path: Path, width: int, height: int, seconds: float) -> int:
    """A moving, noisy scene like a camera's: a panning texture, a moving block, sensor noise."""
    rng = np.random.default_rng(7)
    # A smooth random texture twice the frame size, panned a few pixels per frame.
    coarse = rng.integers(40, 216, (height // 8 + 2, width // 4 + 2), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((16, 16), np.uint8))[: 2 * height, : 2 * width]
    chroma_u = np.full((height // 2, width // 2), 120, np.uint8)
    chroma_v = np.full((height // 2, width // 2), 136, np.uint8)
    frames = round(seconds * FPS)
    # Sensor noise: a few fields, cycled (a prime count, out of step with the GOP).
    noise = [rng.integers(-6, 7, (height, width), dtype=np.int16) for _ in range(7)]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=FPS,
            options={
                "preset": "veryfast",
                "bf": "0",  # cameras rarely send B-frames
                "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0",
            },
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        block = max(16, height // 6)
        for index in range(frames):
            dx = (index * 3) % width
            dy = (index // 2) % height
            luma = texture[dy : dy + height, dx : dx + width].copy()
            bx = int((width - block) * (0.5 + 0.5 * math.sin(index / 20)))
            by = int((height - block) * (0.5 + 0.5 * math.cos(index / 31)))
            luma[by : by + block, bx : bx + block] = 235
            luma = np.clip(luma.astype(np.int16) + noise[index % len(noise)], 16, 235)
            planes = np.concatenate(
                [luma.astype(np.uint8), chroma_u.reshape(-1, width), chroma_v.reshape(-1, width)]
            )
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return frames


# --- (a) streamd ----------------------------------------------------------------------------


def run_streamd(path: Path, sample_fps: float) -> Result:
    return asyncio.run(_streamd(path, sample_fps))


async def _streamd(path: Path, sample_fps: float) -> Result:
    started, cpu = time.perf_counter(), time.process_time()
    registry = CollectorRegistry()
    metrics = Metrics(registry).for_stream("bench")
    config = StreamConfig(
        name="bench", url=str(path), sample_fps=sample_fps, window_s=WINDOW_S, stride_s=STRIDE_S
    )
    ring = frame_ring(config, asyncio.get_running_loop(), metrics)  # the pipeline's own
    source = PyAVSource(config, INPUT_SIZE, ring, metrics)
    source.start()
    windows = 0
    pixels = 0
    try:
        async for window in windows_from(ring, Windower("bench", WINDOW_S, STRIDE_S)):
            windows += 1
            pixels += sum(f.image.shape[0] for f in window.frames)  # touch every frame
    finally:
        source.stop()
        source.join(30)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert pixels > 0  # noqa: S101 - a bench sanity check

    def value(name: str) -> int:
        return int(registry.get_sample_value(name, {"stream": "bench"}) or 0)

    decoded = value("streamd_frames_decoded_total")
    return Result(seconds, cpu, decoded, value("streamd_frames_sampled_total"), windows)


# --- (b) bare PyAV --------------------------------------------------------------------------


def run_bare(path: Path, sample_fps: float) -> Result:
    started, cpu = time.perf_counter(), time.process_time()
    width, height = INPUT_SIZE
    decoded = sampled = 0
    last_slot: int | None = None
    image: npt.NDArray[Any] | None = None  # keep none: streamd frees cut windows too
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            decoded += 1
            slot = math.floor(frame.time * sample_fps + _EPS)
            if last_slot is not None and slot <= last_slot:
                continue
            last_slot = slot
            image = frame.to_ndarray(
                width=width, height=height, format="rgb24", interpolation="BICUBIC"
            )
            sampled += 1
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert sampled == 0 or image is not None  # noqa: S101 - a bench sanity check
    return Result(seconds, cpu, decoded, sampled)


# --- (c) ffmpeg -----------------------------------------------------------------------------

_FRAME_RE = re.compile(rb"frame=\s*(\d+)")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ffmpeg(path: Path, ffmpeg: str) -> Result:
    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        check=True,
    )
    seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu
    counts = _FRAME_RE.findall(proc.stderr)
    return Result(seconds, cpu, int(counts[-1]) if counts else -1, 0)


# --- driver ---------------------------------------------------------------------------------


def best(results: list[Result]) -> Result:
    """The least disturbed run: fastest wall clock, and the lowest CPU time of any run."""
    fastest = min(results, key=lambda r: r.seconds)
    return dataclasses.replace(fastest, cpu=min(r.cpu for r in results))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="clip length")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    args = parser.parse_args(argv)
    ffmpeg = shutil.which("ffmpeg")
    print(f"av {av.__version__}, ffmpeg {'at ' + ffmpeg if ffmpeg else 'MISSING (c skipped)'}")
    rows: list[Row] = []
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp:
        for label, (width, height) in CLIPS.items():
            path = Path(tmp) / f"{label}.mp4"
            started = time.perf_counter()
            frames = write_camera_clip(path, width, height, args.seconds)
            print(
                f"encoded {label}: {frames} frames, {path.stat().st_size / 1e6:.1f} MB "
                f"in {time.perf_counter() - started:.1f}s (not timed)"
            )
            ref = None
            if ffmpeg:
                ref = best([run_ffmpeg(path, ffmpeg) for _ in range(args.repeat)])
            for fps in SAMPLE_RATES:
                # Interleave a and b so that changes in machine load hit both alike.
                a_runs: list[Result] = []
                b_runs: list[Result] = []
                for _ in range(args.repeat):
                    a_runs.append(run_streamd(path, fps))
                    b_runs.append(run_bare(path, fps))
                    loads.append(os.getloadavg()[0])
                a, b = best(a_runs), best(b_runs)
                if (a.decoded, a.sampled) != (b.decoded, b.sampled):
                    print(f"WARNING {label}@{fps:g}: a and b disagree: {a} vs {b}")
                pairs = zip(a_runs, b_runs, strict=True)
                paired = statistics.median(x.seconds / y.seconds for x, y in pairs)
                rows.append(Row(label, fps, a, b, ref, paired))
    print_table(rows, args.repeat)
    cores = os.cpu_count() or 1
    if max(loads) > cores:
        print(f"NOTE: load average reached {max(loads):.1f} on {cores} cores: wall times are noisy")
    return 0


def print_table(rows: list[Row], repeat: int) -> None:
    header = (
        f"{'clip':<6} {'fps':>4} {'a streamd':>10} {'b PyAV':>8} {'c ffmpeg':>9} {'a/b':>6} "
        f"{'a/c':>6} {'a/b cpu':>8} {'a/b pair':>9} {'decoded':>8} {'sampled':>8} {'windows':>8}"
    )
    print()
    print(header)
    print("-" * len(header))
    over_goal = False
    for row in rows:
        label, fps, a, b, ref, paired = row.clip, row.fps, row.a, row.b, row.c, row.paired
        over_goal |= a.seconds / b.seconds > GOAL
        c_text = f"{ref.seconds:9.3f}" if ref else f"{'-':>9}"
        ac_text = f"{a.seconds / ref.seconds:6.2f}" if ref else f"{'-':>6}"
        print(
            f"{label:<6} {fps:>4g} {a.seconds:10.3f} {b.seconds:8.3f} {c_text} "
            f"{a.seconds / b.seconds:6.2f} {ac_text} {a.cpu / b.cpu:8.2f} {paired:9.2f} "
            f"{a.decoded:>8} {a.sampled:>8} {a.windows:>8}"
        )
    verdict = "MISSED" if over_goal else "met"
    print(
        f"\nwall seconds, best of {repeat}; a/b cpu: CPU seconds of all threads, best of {repeat};"
        f"\na/b pair: median of a/b over back-to-back runs (robust to load drifting mid-run)."
        f"\ngoal a/b <= {GOAL:.2f}: {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
