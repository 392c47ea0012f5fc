"""Frame-difference motion measures (pure numpy): the motion backend, ``motion_gate``, snapshots."""

from __future__ import annotations

import itertools
import math
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


def analyse(frames: Sequence[Frame]) -> MotionReport:
    """Measure motion across ``frames`` (oldest first)."""
    thumbs = [thumbnail(frame.image) for frame in frames]
    changed = tuple(
        float(np.mean(np.abs(after - before) > PIXEL_THRESHOLD))
        for before, after in itertools.pairwise(thumbs)
    )
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
