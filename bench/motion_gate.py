"""Motion gate: model calls saved and scripted events kept, per ``motion_gate`` value.

    python bench/motion_gate.py [--minutes 25] [--short-minutes 6] [--size 640x360] [--json PATH]

Encodes (with PyAV, into a temporary directory; not timed) static surveillance footage: a
textured still scene (sky, two buildings with windows, a road, grass), sensor noise, slow
lighting drift and passing clouds, as H.264 the way cameras send it (libx264, 10 fps, a
keyframe every 2 s, no B-frames, a capped bitrate: 512 kbit/s at 640x360). Three scenes:

- ``quiet`` (``--minutes``, 25): daylight, light sensor noise, nothing else moves;
- ``night`` (``--short-minutes``, 6): the same scene at 45% of the light with heavy sensor
  noise (sigma 6 levels), which the encoder turns into crawling blocks;
- ``windy`` (``--short-minutes``): daylight with a tree whose foliage sways all the time
  (about 5% of the picture).

Scripted events at known times, spread evenly over each clip: a person crossing, a small
distant person, a slow walker, a package put down that stays, a brief 1.5 s pass (one sampled
frame shows it), a car, and a porch light switching on.

Each clip is then read through streamd's own path (``PyAVSource`` -> ``FrameRing`` ->
``windows_from``/``Windower``, at the stream defaults: 8 s windows every 4 s, 1 fps, 512x512)
and ``motion.analyse`` runs on every window, as the pipeline's gate does. For each gate value:
the windows that pass (the model calls), the reduction against gate off, and the events missed
(an event is caught when at least one window overlapping it passes). The default run takes
about 2 minutes on 2 cores, most of it encoding; ``--json`` also writes the results there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from streamd import motion
from streamd.config import MOTION_GATE_AUTO, StreamConfig
from streamd.hardware import this_cpu
from streamd.ingest import PyAVSource
from streamd.metrics import Metrics
from streamd.pipeline import frame_ring, windows_from
from streamd.window import Windower

FPS = 10
GOP_S = 2
INPUT_SIZE = (512, 512)
GATES = (0.0, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
GOAL = 10.0
KBITS_PER_PIXEL = 512 / (640 * 360)
"""512 kbit/s at 640x360 (a camera's sub-stream), scaled with the picture's area."""
NOISE_FIELDS = 13
CLOUD_PERIODS_S = (97, 181, 263)
"""Sensor noise: this many random fields, cycled (a prime count, out of step with the GOP)."""

Luma = npt.NDArray[np.float32]
Draw = Callable[[Luma, float], None]


# --- the scene ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scripted:
    """One scripted event: its name, when it shows (seconds) and how it is drawn."""

    name: str
    start_s: float
    end_s: float
    draw: Draw


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> Luma:
    """Random values in -1..1 on a grid of ``cell`` pixels, bilinearly upsampled to ``shape``."""
    height, width = shape
    coarse = rng.uniform(-1, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
    ys = np.arange(height, dtype=np.float32) / cell
    xs = np.arange(width, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    out: Luma = top * (1 - fy) + bottom * fy
    return out


def still_scene(width: int, height: int, rng: np.random.Generator) -> Luma:
    """Luma of the empty scene: sky, two buildings with windows, a sidewalk, a road, grass."""
    luma = np.empty((height, width), np.float32)
    rows = np.arange(height, dtype=np.float32)[:, None]
    horizon = int(0.45 * height)
    luma[:horizon] = 200 - 30 * rows[:horizon] / horizon  # sky, brighter at the top
    luma[horizon:] = 100  # grass
    sidewalk, road = int(0.62 * height), int(0.70 * height)
    luma[sidewalk:road] = 135
    luma[road : int(0.88 * height)] = 80
    for x in range(0, width, width // 8):  # lane marks
        luma[int(0.785 * height) : int(0.795 * height), x : x + width // 20] = 190
    for left, right, top, level in ((0.04, 0.42, 0.12, 115), (0.55, 0.90, 0.22, 150)):
        x0, x1, y0 = int(left * width), int(right * width), int(top * height)
        luma[y0:sidewalk, x0:x1] = level
        step_x, step_y = max(8, width // 32), max(8, height // 14)
        for wy in range(y0 + step_y // 2, sidewalk - step_y, step_y):
            for wx in range(x0 + step_x // 2, x1 - step_x // 2, step_x):
                luma[wy : wy + step_y // 2, wx : wx + step_x // 2] = level - 60
    # Texture at two scales (brickwork, asphalt, grass), then a little blur from the lens.
    luma += 14 * smooth_noise(rng, (height, width), max(4, width // 40))
    luma += 8 * smooth_noise(rng, (height, width), 2)
    return luma


@dataclass(frozen=True, slots=True)
class Person:
    """A walker: light top, dark legs, a head; sizes and positions in fractions of the frame."""

    width: float
    height: float
    x0: float
    x1: float
    feet_y: float
    start_s: float
    duration_s: float

    def __call__(self, luma: Luma, t: float) -> None:
        frame_h, frame_w = luma.shape
        progress = (t - self.start_s) / self.duration_s
        if not 0 <= progress <= 1:
            return
        w, h = max(2, round(self.width * frame_w)), max(4, round(self.height * frame_h))
        x = round((self.x0 + (self.x1 - self.x0) * progress) * frame_w)
        bottom = round(self.feet_y * frame_h)
        top = bottom - h
        head = h // 7
        box(luma, x + w // 4, top, x + w - w // 4, top + head, 125)
        box(luma, x, top + head, x + w, top + h // 2, 165)
        box(luma, x + w // 8, top + h // 2, x + w - w // 8, bottom, 45)


def box(luma: Luma, x0: int, y0: int, x1: int, y1: int, level: float) -> None:
    """Fill a rectangle clipped to the picture."""
    height, width = luma.shape
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x0 < x1 and y0 < y1:
        luma[y0:y1, x0:x1] = level


def package(x: float, y: float, size: float, at_s: float) -> Draw:
    """A box put down at ``at_s`` (over half a second) that then stays."""

    def draw(luma: Luma, t: float) -> None:
        if t < at_s:
            return
        frame_h, frame_w = luma.shape
        alpha = min(1.0, (t - at_s) / 0.5)
        x0, y0 = round(x * frame_w), round(y * frame_h)
        x1, y1 = x0 + round(size * frame_w), y0 + round(0.7 * size * frame_w)
        region = luma[y0:y1, x0:x1]
        region += alpha * (175 - region)

    return draw


def car(at_s: float, duration_s: float) -> Draw:
    """A car passing on the road, right to left."""

    def draw(luma: Luma, t: float) -> None:
        progress = (t - at_s) / duration_s
        if not 0 <= progress <= 1:
            return
        frame_h, frame_w = luma.shape
        w, h = round(0.22 * frame_w), round(0.10 * frame_h)
        x = round((1 - 1.3 * progress) * frame_w)
        bottom = round(0.80 * frame_h)
        box(luma, x, bottom - h, x + w, bottom, 55)
        box(luma, x + w // 5, bottom - h - h // 2, x + w - w // 4, bottom - h, 70)
        box(luma, x + w // 4, bottom - h - h // 3, x + w - w // 3, bottom - h - 2, 160)

    return draw


def porch_light(at_s: float, x: float, y: float) -> Draw:
    """A lamp switching on at ``at_s``: a pool of light that fades in over 0.2 s and stays."""
    cache: dict[tuple[int, int], Luma] = {}

    def draw(luma: Luma, t: float) -> None:
        if t < at_s:
            return
        frame_h, frame_w = luma.shape
        glow = cache.get(luma.shape)
        if glow is None:
            ys = (np.arange(frame_h, dtype=np.float32)[:, None] - y * frame_h) / frame_w
            xs = (np.arange(frame_w, dtype=np.float32)[None, :] - x * frame_w) / frame_w
            glow = 70 * np.exp(-(xs**2 + ys**2) / (2 * 0.06**2)).astype(np.float32)
            cache[luma.shape] = glow
        luma += min(1.0, (t - at_s) / 0.2) * glow

    return draw


def script(duration_s: float) -> list[Scripted]:
    """The events, spread evenly over the clip (one every ``duration_s / 7``)."""
    slot = duration_s / 7

    def at(index: int) -> float:
        return round(slot * (index + 0.5)) + 0.3  # 0.3 s after a 1 fps sample

    events: list[Scripted] = []

    def walker(name: str, index: int, seconds: float, **shape: float) -> None:
        start = at(index)
        person = Person(start_s=start, duration_s=seconds, **shape)
        events.append(Scripted(name, start, start + seconds, person))

    walker("person crossing", 0, 8.0, width=0.045, height=0.22, x0=0.1, x1=0.8, feet_y=0.86)
    walker("distant person", 1, 20.0, width=0.012, height=0.055, x0=0.15, x1=0.55, feet_y=0.66)
    walker("slow walker", 2, 40.0, width=0.04, height=0.2, x0=0.6, x1=0.25, feet_y=0.84)
    start = at(3)
    events.append(Scripted("package left", start, start + 1.0, package(0.47, 0.64, 0.05, start)))
    walker("brief 1.5 s pass", 4, 1.5, width=0.07, height=0.34, x0=-0.07, x1=1.0, feet_y=0.98)
    start = at(5)
    events.append(Scripted("car passing", start, start + 3.0, car(start, 3.0)))
    start = at(6)
    events.append(Scripted("porch light on", start, start + 1.0, porch_light(start, 0.48, 0.5)))
    return events


@dataclass(frozen=True, slots=True)
class Scene:
    """What a clip shows besides the events."""

    name: str
    minutes: float
    tree: bool = False
    light: float = 1.0
    noise_sigma: float = 2.5


class Tree:
    """A tree in the wind: clumps of leaves with sky between them, swaying 2-6 px at 640 wide.

    The canopy is about 5% of the picture; gusts come and go over tens of seconds.
    """

    def __init__(self, width: int, height: int, rng: np.random.Generator) -> None:
        radius_y, radius_x = 0.17 * height, 0.11 * width
        cy, cx = 0.28 * height, 0.93 * width
        self.rows = slice(max(0, round(cy - radius_y)), round(cy + radius_y))
        self.cols = slice(round(cx - radius_x), width)
        box_h = self.rows.stop - self.rows.start
        box_w = self.cols.stop - self.cols.start
        ys, xs = np.ogrid[self.rows, self.cols]
        self.mask = ((ys - cy) / radius_y) ** 2 + ((xs - cx) / radius_x) ** 2 < 1
        self.pad = math.ceil(0.01 * width) + 1
        shape = (box_h, box_w + 2 * self.pad)
        clumps = smooth_noise(rng, shape, max(4, width // 60))
        self.alpha = np.clip((clumps + 0.25) * 4, 0, 1)  # leaves where 1, sky where 0
        self.leaves = 65 + 25 * smooth_noise(rng, shape, 2)
        self.amplitude_px = 0.003 * width
        self.trunk = (slice(round(cy), round(0.62 * height)), slice(round(cx) - 4, round(cx) + 4))

    def draw(self, luma: Luma, t: float) -> None:
        """Paint the trunk and the canopy at its position at ``t``."""
        gust = 0.5 + 0.5 * math.sin(2 * math.pi * t / 37) * math.sin(2 * math.pi * t / 11)
        shift = self.amplitude_px * (1 + 2 * gust) * math.sin(2 * math.pi * t / 2.3)
        whole = math.floor(shift)
        frac = shift - whole
        width = self.cols.stop - self.cols.start
        start = self.pad + whole

        def at(offset: int) -> tuple[Luma, Luma]:
            cols = slice(start + offset, start + offset + width)
            return self.alpha[:, cols], self.leaves[:, cols]

        (alpha0, leaves0), (alpha1, leaves1) = at(0), at(1)
        alpha = (1 - frac) * alpha0 + frac * alpha1
        leaves = (1 - frac) * leaves0 + frac * leaves1
        luma[self.trunk] = 60
        region = luma[self.rows, self.cols]
        canopy = alpha * leaves + (1 - alpha) * region
        region[self.mask] = canopy[self.mask]


class Renderer:
    """Frames of a scene at time ``t``: still scene, lighting, tree, events, sensor noise."""

    def __init__(self, scene: Scene, width: int, height: int, events: Sequence[Scripted]) -> None:
        rng = np.random.default_rng(11)
        self.scene = scene
        self.events = events
        self.base = still_scene(width, height, rng)
        self.noise = [
            rng.normal(0, scene.noise_sigma, (height, width)).astype(np.float32)
            for _ in range(NOISE_FIELDS)
        ]
        self.clouds = rng.uniform(0, 2 * math.pi, 3)
        self.tree = Tree(width, height, rng) if scene.tree else None

    def luma(self, t: float) -> npt.NDArray[np.uint8]:
        """The picture's luma at ``t``, ready for the encoder."""
        luma = self.base.copy()
        for event in self.events:
            event.draw(luma, t)
        if self.tree is not None:
            self.tree.draw(luma, t)
        # Slow drift (20 min period) and passing clouds (a few minutes each): a few % of gain.
        gain = 1 + 0.05 * math.sin(2 * math.pi * t / 1200)
        for period, phase in zip(CLOUD_PERIODS_S, self.clouds, strict=True):
            gain += 0.015 * math.sin(2 * math.pi * t / period + phase)
        luma *= gain * self.scene.light
        luma += self.noise[round(t * FPS) % NOISE_FIELDS]
        return np.clip(luma, 16, 235).astype(np.uint8)


def write_clip(path: Path, scene: Scene, width: int, height: int) -> None:
    """Encode the scene and its scripted events to ``path`` as a camera would."""
    duration_s = scene.minutes * 60
    events = script(duration_s)
    renderer = Renderer(scene, width, height, events)
    chroma = np.concatenate(
        [
            np.full((height // 2, width // 2), 124, np.uint8).reshape(-1, width),
            np.full((height // 2, width // 2), 131, np.uint8).reshape(-1, width),
        ]
    )
    kbits = round(KBITS_PER_PIXEL * width * height)
    gop = GOP_S * FPS
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=FPS,
            options={
                "preset": "superfast",
                "bf": "0",  # cameras rarely send B-frames
                "x264-params": (
                    f"keyint={gop}:min-keyint={gop}:scenecut=0"
                    f":bitrate={kbits}:vbv-maxrate={kbits}:vbv-bufsize={2 * kbits}"
                ),
            },
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        for index in range(round(duration_s * FPS)):
            planes = np.concatenate([renderer.luma(index / FPS), chroma])
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --- streamd's path -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    """One window: its span and its motion score (``motion.analyse(...).peak``)."""

    start_s: float
    end_s: float
    peak: float


def measure(path: Path) -> list[Measured]:
    """Every window streamd cuts from the file, with its motion score."""
    return asyncio.run(_measure(path))


async def _measure(path: Path) -> list[Measured]:
    config = StreamConfig(name="bench", url=str(path))  # the stream defaults
    metrics = Metrics(CollectorRegistry()).for_stream("bench")
    ring = frame_ring(config, asyncio.get_running_loop(), metrics)
    source = PyAVSource(config, INPUT_SIZE, ring, metrics)
    windower = Windower("bench", config.window_s, config.stride_s)
    out: list[Measured] = []
    source.start()
    try:
        async for window in windows_from(ring, windower):
            peak = motion.analyse(window.frames).peak
            out.append(Measured(window.start_s, window.end_s, peak))
    finally:
        source.stop()
        source.join(30)
    return out


def passes(peak: float, gate: float) -> bool:
    """The pipeline's rule: gated when ``gate > 0 and peak < gate``."""
    return not (gate > 0 and peak < gate)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateRow:
    gate: float
    calls: int  # windows that pass: model calls
    reduction: float  # windows / calls
    missed: list[str]  # events no passing window overlaps


@dataclass(frozen=True, slots=True)
class EventRow:
    name: str
    start_s: float
    end_s: float
    windows: int  # windows that overlap it
    peak: float  # the largest motion score of those
    passed: int  # of those, how many pass the surveillance default


@dataclass(frozen=True, slots=True)
class SceneResult:
    scene: str
    minutes: float
    size: str
    kbits: int
    mbytes: float
    windows: int
    event_windows: int  # windows that overlap some event
    static_peak_max: float  # the largest motion score of a window that overlaps no event
    events: list[EventRow]
    gates: list[GateRow]
    read_s: float


def overlaps(window: Measured, event: Scripted) -> bool:
    return window.start_s < event.end_s and window.end_s > event.start_s


def evaluate(
    scene: Scene, clip: dict[str, float | int | str], windows: list[Measured], chosen: float
) -> SceneResult:
    """Per gate: calls and missed events; per event: its score and windows passed."""
    events = script(scene.minutes * 60)
    static = [w.peak for w in windows if not any(overlaps(w, e) for e in events)]
    event_rows = []
    for event in events:
        mine = [w for w in windows if overlaps(w, event)]
        peak = max((w.peak for w in mine), default=0.0)
        passed = sum(passes(w.peak, chosen) for w in mine)
        event_rows.append(EventRow(event.name, event.start_s, event.end_s, len(mine), peak, passed))
    gates = []
    for gate in sorted({*GATES, chosen}):
        calls = sum(passes(w.peak, gate) for w in windows)
        missed = [
            e.name
            for e in events
            if not any(overlaps(w, e) and passes(w.peak, gate) for w in windows)
        ]
        gates.append(GateRow(gate, calls, len(windows) / max(calls, 1), missed))
    return SceneResult(
        scene=scene.name,
        minutes=scene.minutes,
        size=str(clip["size"]),
        kbits=int(clip["kbits"]),
        mbytes=float(clip["mbytes"]),
        windows=len(windows),
        event_windows=sum(any(overlaps(w, e) for e in events) for w in windows),
        static_peak_max=max(static, default=0.0),
        events=event_rows,
        gates=gates,
        read_s=float(clip["read_s"]),
    )


def print_scene(result: SceneResult, chosen: float) -> None:
    print(
        f"\nscene {result.scene}: {result.minutes:g} min {result.size} at {FPS} fps,"
        f" {result.kbits} kbit/s H.264 ({result.mbytes:.1f} MB), read in {result.read_s:.1f}s:"
        f" {result.windows} windows, {result.event_windows} overlap an event;"
        f" motion score of the others at most {result.static_peak_max:.4f}"
    )
    header = (
        f"{'event':<18} {'at':>11} {'windows':>8} {'score':>7} {'passed at ' + f'{chosen:g}':>16}"
    )
    print(header)
    print("-" * len(header))
    for event in result.events:
        span = f"{event.start_s:.0f}-{event.end_s:.0f}s"
        print(
            f"{event.name:<18} {span:>11} {event.windows:>8} {event.peak:7.4f} {event.passed:>16}"
        )
    header = f"{'gate':>7} {'calls':>6} {'reduction':>10}  missed"
    print()
    print(header)
    print("-" * len(header))
    for row in result.gates:
        gate = "off" if row.gate == 0 else f"{row.gate:g}"
        mark = "  <- surveillance default" if row.gate == chosen > 0 else ""
        missed = ", ".join(row.missed) or "none"
        print(f"{gate:>7} {row.calls:>6} {row.reduction:>9.1f}x  {missed}{mark}")


def verdict(results: Sequence[SceneResult], chosen: float) -> str:
    """The goal, checked for the surveillance default: >= 10x on quiet, no event missed."""
    rows = {r.scene: next(g for g in r.gates if g.gate == chosen) for r in results}
    missed = sorted({f"{name} ({scene})" for scene, row in rows.items() for name in row.missed})
    quiet = rows.get("quiet")
    met = quiet is not None and quiet.reduction >= GOAL and not missed
    reduction = f"{quiet.reduction:.1f}x fewer calls on quiet" if quiet else "no quiet scene"
    return (
        f"surveillance default {chosen:g}: {reduction}, missed: {', '.join(missed) or 'none'}"
        f"; goal (>= {GOAL:g}x, none missed) {'met' if met else 'MISSED'}"
    )


def cpu_name() -> str:
    """The CPU's model, usable cores and SIMD/AMX flags."""
    return this_cpu().summary()


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) % 2 or int(height) % 2:
        raise argparse.ArgumentTypeError(f"want WIDTHxHEIGHT, even numbers, not {text!r}")
    return int(width), int(height)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="length of the quiet clip")
    parser.add_argument(
        "--short-minutes", type=float, default=6.0, help="length of night and windy; 0 skips them"
    )
    parser.add_argument("--size", type=parse_size, default=(640, 360), help="WIDTHxHEIGHT")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    width, height = args.size
    kbits = round(KBITS_PER_PIXEL * width * height)
    chosen = MOTION_GATE_AUTO.get("surveillance", 0.0)
    scenes = [Scene("quiet", args.minutes)]
    if args.short_minutes > 0:
        scenes.append(Scene("night", args.short_minutes, light=0.45, noise_sigma=6.0))
        scenes.append(Scene("windy", args.short_minutes, tree=True))
    print(
        f"av {av.__version__}, numpy {np.__version__}, {cpu_name()}, {os.cpu_count()} cores,"
        f" load {os.getloadavg()[0]:.1f}; motion_gate auto for surveillance = {chosen:g}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp:
        for scene in scenes:
            path = Path(tmp) / f"{scene.name}.mp4"
            started = time.perf_counter()
            write_clip(path, scene, width, height)
            mbytes = path.stat().st_size / 1e6
            print(f"encoded {scene.name}: {mbytes:.1f} MB in {time.perf_counter() - started:.1f}s")
            started = time.perf_counter()
            windows = measure(path)
            read_s = time.perf_counter() - started
            clip = {"size": f"{width}x{height}", "kbits": kbits, "mbytes": mbytes, "read_s": read_s}
            results.append(evaluate(scene, clip, windows, chosen))
    for result in results:
        print_scene(result, chosen)
    print(f"\n{verdict(results, chosen)}")
    if args.json is not None:
        report = {"gate": chosen, "scenes": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
