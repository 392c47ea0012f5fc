"""Frame-difference motion measures (pure numpy): the motion backend, ``motion_gate``, snapshots."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamd.domain import Frame, Image
from streamd.timefmt import format_clock

GRID = 64
"""Pictures are compared on a GRID x GRID grayscale thumbnail."""
PIXEL_THRESHOLD = 0.08
"""A thumbnail pixel changed if its brightness moved by more than this (0-1): above noise."""
SCENE_CUT_FRACTION = 0.6
"""Two consecutive samples that differ in this much of the picture are a scene cut."""
QUIET_FRACTION = 0.002
"""Changed fraction that still counts as no motion (significance 1)."""
SATURATED_FRACTION = 0.5
"""Changed fraction that gets the top significance."""


@dataclass(frozen=True, slots=True)
class MotionReport:
    """What changed between the consecutive frames of a window.

    Attributes:
        changed: For each pair of consecutive frames, the fraction of the picture that changed.
        peak: The largest of ``changed`` (0 for a single frame); the window's motion score.
        peak_index: Index of the frame right after the largest change.
        scene_cut: Whether the largest change looks like a cut.
    """

    changed: tuple[float, ...]
    peak: float
    peak_index: int
    scene_cut: bool


def thumbnail(image: Image) -> npt.NDArray[np.float32]:
    """A GRID x GRID grayscale version of ``image`` in 0-1: the mean of each cell (~1 ms).

    The mean, not one pixel per cell: a small, distant object that falls between the pixels a
    stride would pick still changes its cell, and sensor noise averages out instead of
    crossing ``PIXEL_THRESHOLD`` (bench/motion_gate.py measures both).
    """
    height, width, channels = image.shape
    step_y, step_x = max(1, height // GRID), max(1, width // GRID)
    rows, cols = min(GRID, height // step_y), min(GRID, width // step_x)
    cells = image[: rows * step_y, : cols * step_x].reshape(rows, step_y, cols, step_x, channels)
    gray: npt.NDArray[np.float32] = cells.mean(axis=(1, 3, 4), dtype=np.float32) / 255.0
    return gray


def changed_fraction(before: npt.NDArray[np.float32], after: npt.NDArray[np.float32]) -> float:
    """The fraction of two thumbnails' pixels whose brightness moved past ``PIXEL_THRESHOLD``."""
    return float(np.mean(np.abs(after - before) > PIXEL_THRESHOLD))


def analyse(frames: Sequence[Frame]) -> MotionReport:
    """Measure motion across ``frames`` (oldest first)."""
    thumbs = [thumbnail(frame.image) for frame in frames]
    changed = tuple(changed_fraction(before, after) for before, after in itertools.pairwise(thumbs))
    if not changed:
        return MotionReport(changed=(), peak=0.0, peak_index=0, scene_cut=False)
    peak_pair = int(np.argmax(changed))
    peak = changed[peak_pair]
    return MotionReport(
        changed=changed,
        peak=peak,
        peak_index=peak_pair + 1,
        scene_cut=peak >= SCENE_CUT_FRACTION,
    )


def significance_of(peak: float) -> int:
    """Map the changed fraction to 1-10 on a log scale (0.2% -> 1, 5% -> 6, 50% -> 10)."""
    if peak <= QUIET_FRACTION:
        return 1
    span = math.log10(SATURATED_FRACTION / QUIET_FRACTION)
    level = min(1.0, math.log10(peak / QUIET_FRACTION) / span)
    return 1 + round(9 * level)


def describe(report: MotionReport, frames: Sequence[Frame]) -> str:
    """One plain sentence of what was measured."""
    if report.peak <= QUIET_FRACTION:
        return "No motion."
    at = format_clock(frames[report.peak_index].pts_s)
    if report.scene_cut:
        return f"Scene cut at {at} ({report.peak:.0%} of the picture changed)."
    moving = sum(1 for fraction in report.changed if fraction > QUIET_FRACTION)
    return (
        f"Motion in {report.peak:.0%} of the picture at {at}"
        f" ({moving} of {len(report.changed)} frame steps moving)."
    )


class MotionWatch:
    """Which frames of a motion-gated live stream are worth encoding before their windows.

    A window passes the gate when two of its consecutive frames differ by ``gate`` or more,
    and only frames of such windows are ever encoded. So a frame is worth encoding ahead only
    within ``window_s`` of such a pair, before or after it: when a pair moves, the frames of
    the last ``window_s`` (not offered yet) and the pair go out, and every frame for
    ``window_s`` after it. Static scenes offer nothing, so the gate's saving stays whole.

    The set is a little wider than the windows that will pass (a window must hold both frames
    of the pair), and a passing window can still be dropped as busy: a frame offered in vain
    costs one encode of spare model time; one missed is encoded by its window as before.

    Pure (no I/O, no clock): ``push`` each sampled frame in order, ~1 ms each (a thumbnail).
    """

    def __init__(self, gate: float, window_s: float) -> None:
        if gate <= 0:
            raise ValueError(f"gate must be > 0, not {gate}")
        self._gate = gate
        self._window_s = window_s
        self._previous: tuple[float, npt.NDArray[np.float32]] | None = None
        self._unoffered: deque[Frame] = deque()  # the last window_s of frames not offered yet
        self._hot_until = -math.inf

    def push(self, frame: Frame) -> list[Frame]:
        """Take the next sampled frame; return the frames to encode ahead now, oldest first."""
        thumb = thumbnail(frame.image)
        previous, self._previous = self._previous, (frame.pts_s, thumb)
        if previous is not None and frame.pts_s <= previous[0]:
            # Time went back (a file looped, a source restarted): the windows after a break
            # start afresh, so this frame pairs with nothing before it.
            previous, self._hot_until = None, -math.inf
            self._unoffered.clear()
        moved = previous is not None and changed_fraction(previous[1], thumb) >= self._gate
        while self._unoffered and self._unoffered[0].pts_s <= frame.pts_s - self._window_s:
            self._unoffered.popleft()
        if moved:
            self._hot_until = frame.pts_s + self._window_s
            offered = [*self._unoffered, frame]
            self._unoffered.clear()
            return offered
        if frame.pts_s < self._hot_until:
            return [frame]
        self._unoffered.append(frame)
        return []
