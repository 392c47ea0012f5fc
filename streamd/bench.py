"""``streamd bench``: what this machine does with the configured model, in the config's terms.

Scores windows of generated frames (nothing is downloaded when the model is local) the way a
live stream feeds them: each window shares all but ``stride_s x sample_fps`` frames with the
one before, so the vision cache works as it does live. Every window is scored twice, with its
description and without (a quiet window below ``min_significance``), on frames of their own.
From the steady-state windows (the first one pays for a whole window of vision) it reports
seconds of vision per new frame, prefill per window, decode tokens/s, and how many streams
the model holds in real time: a stream needs one window analysed every ``stride_s``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from streamd.config import ModelSection, StreamDefaults
from streamd.domain import Frame, Image, Score, ScoreRequest, Window
from streamd.hardware import this_cpu
from streamd.scoring import create_backend
from streamd.scoring.base import ScoringBackend
from streamd.scoring.prompt import resolve_prompt

QUIET = 11
"""``describe_below`` that no score reaches: the window is scored, not described."""
WALL_ORIGIN_S = 1_700_000_000.0


@dataclass(frozen=True, slots=True)
class BenchResult:
    """What ``streamd bench`` measured (seconds unless named otherwise)."""

    backend: str
    model: str
    window_s: float
    stride_s: float
    sample_fps: float
    windows: int
    load_s: float
    vision_s_per_frame: float
    prefill_s: float
    window_s_described: float
    window_s_quiet: float
    decode_tokens_per_s: float | None
    streams_described: float
    streams_quiet: float
    cpu: str = ""
    """The CPU's model, usable cores and SIMD/AMX flags: the numbers depend on them."""

    def to_json(self) -> dict[str, object]:
        """Rounded, for ``--json``."""
        return {
            key: round(value, 4) if isinstance(value, float) else value
            for key, value in asdict(self).items()
        }

    def table(self) -> str:
        """The human summary."""
        tokens = (
            f"{self.decode_tokens_per_s:.1f} tokens/s"
            if self.decode_tokens_per_s is not None
            else "n/a (no tokens generated)"
        )
        rows = [
            ("model", f"{self.model} ({self.backend}), loaded in {self.load_s:.1f}s"),
            (
                "windows",
                f"{self.window_s:g}s every {self.stride_s:g}s at {self.sample_fps:g} fps"
                f" ({self.windows} measured, each with and without a description)",
            ),
            ("vision", f"{self.vision_s_per_frame:.3f}s per new frame"),
            ("prefill", f"{self.prefill_s:.3f}s per window"),
            ("decode", tokens),
            (
                "a window",
                f"{self.window_s_described:.2f}s described, {self.window_s_quiet:.2f}s quiet",
            ),
            (
                "streams held",
                f"{self.streams_described:.1f} when every window is described,"
                f" {self.streams_quiet:.1f} when scenes are quiet",
            ),
        ]
        if self.cpu:
            rows.insert(1, ("cpu", self.cpu))
        return "\n".join(f"{name:<13} {value}" for name, value in rows)


def run_bench(model: ModelSection, stream: StreamDefaults, windows: int = 6) -> BenchResult:
    """Load the model, score ``windows`` windows twice (described and quiet), summarise.

    Blocking: the CLI runs it on its own. Raises ``ModelError`` if the model cannot be loaded.
    """
    backend = create_backend(model)
    started = time.perf_counter()
    backend.load()
    try:
        backend.warm_up()
        load_s = time.perf_counter() - started
        prompt = resolve_prompt(stream.profile, stream.system_prompt, stream.prompt)
        described: list[tuple[Score, float]] = []
        quiet: list[tuple[Score, float]] = []
        pairs = zip(
            _windows("bench-described", stream, backend, windows),
            _windows("bench-quiet", stream, backend, windows),
            strict=True,
        )
        for loud, calm in pairs:
            described.append(_timed(backend, ScoreRequest(loud, prompt, None)))
            quiet.append(_timed(backend, ScoreRequest(calm, prompt, QUIET)))
    finally:
        backend.close()
    return _summarise(backend, stream, load_s, described, quiet)


def _windows(
    name: str, stream: StreamDefaults, backend: ScoringBackend, count: int
) -> list[Window]:
    """``count`` overlapping windows of generated frames, cut as a live stream cuts them."""
    per_window = max(1, round(stream.window_s * stream.sample_fps))
    per_stride = max(1, min(per_window, round(stream.stride_s * stream.sample_fps)))
    period = 1 / stream.sample_fps
    width, height = backend.input_size
    rng = np.random.default_rng(len(name))
    total = per_window + per_stride * (count - 1)
    frames = [
        Frame(name, i, i * period, WALL_ORIGIN_S + i * period, _picture(rng, width, height))
        for i in range(total)
    ]
    cut = []
    for seq in range(count):
        first = seq * per_stride
        shot = tuple(frames[first : first + per_window])
        start = shot[0].pts_s
        cut.append(
            Window(name, seq + 1, start, start + stream.window_s, shot, WALL_ORIGIN_S + start)
        )
    return cut


def _picture(rng: np.random.Generator, width: int, height: int) -> Image:
    """A random picture: noise over a gradient (the encoder's cost does not depend on it)."""
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 64, (height, width, 3))
    return ((gradient + noise) % 256).astype(np.uint8)


def _timed(backend: ScoringBackend, request: ScoreRequest) -> tuple[Score, float]:
    started = time.perf_counter()
    (score,) = backend.score([request])
    return score, time.perf_counter() - started


def _summarise(
    backend: ScoringBackend,
    stream: StreamDefaults,
    load_s: float,
    described: Sequence[tuple[Score, float]],
    quiet: Sequence[tuple[Score, float]],
) -> BenchResult:
    # The first window encodes every frame; the rest only the new ones: steady state.
    steady = described[1:] or described
    steady_quiet = quiet[1:] or quiet
    both = [*steady, *steady_quiet]
    new_frames = sum(score.timings.vision_misses for score, _ in both)
    vision = sum(score.timings.vision_s for score, _ in both)
    tokens = sum(score.timings.completion_tokens for score, _ in steady)
    decode_s = sum(score.timings.generate_s for score, _ in steady)
    loud = statistics.median(seconds for _, seconds in steady)
    calm = statistics.median(seconds for _, seconds in steady_quiet)
    return BenchResult(
        backend=backend.name,
        model=backend.model_id,
        window_s=stream.window_s,
        stride_s=stream.stride_s,
        sample_fps=stream.sample_fps,
        windows=len(described),
        load_s=load_s,
        vision_s_per_frame=vision / new_frames if new_frames else 0.0,
        prefill_s=statistics.median(score.timings.prefill_s for score, _ in both),
        window_s_described=loud,
        window_s_quiet=calm,
        decode_tokens_per_s=tokens / decode_s if tokens and decode_s > 0 else None,
        streams_described=_streams(stream.stride_s, loud),
        streams_quiet=_streams(stream.stride_s, calm),
        cpu=this_cpu().summary(),
    )


def _streams(stride_s: float, window_seconds: float) -> float:
    """Streams held, one window at a time: each needs a window analysed every ``stride_s``.

    For a model server that batches ``max_in_flight`` requests this is the floor.
    """
    if window_seconds <= 0:
        return float("inf")
    return stride_s / window_seconds
