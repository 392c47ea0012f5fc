"""The motion backend: significance from frame-difference energy, no weights needed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from streamd import motion
from streamd.config import ModelConfig
from streamd.domain import Score, ScoreRequest, StageTimings
from streamd.scoring.base import NothingAhead

INPUT_SIZE = (512, 512)
"""Same as SmolVLM2's, so snapshots look the same whichever backend made them."""


class MotionBackend(NothingAhead):
    """Scores a window by how much of the picture changes between samples.

    Static scenes score 1, a person crossing a camera's view about 6, scene cuts and large
    movement 8-10. It ignores the prompt: useful on CPU-only machines as a cheap detector, and
    deterministic, which makes it the backend of event tests.
    """

    name = "motion"

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.model_id = "motion"
        self._config = config

    @property
    def input_size(self) -> tuple[int, int]:
        """Frame size the ingest path resizes to."""
        return INPUT_SIZE

    @property
    def max_in_flight(self) -> int:
        """One call at a time, on the model thread."""
        return 1

    @property
    def max_batch(self) -> int:
        """Windows per ``score`` call."""
        return 16

    def load(self) -> None:
        """Nothing to load."""

    def warm_up(self) -> None:
        """Nothing to warm."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score each window from its frame differences."""
        started = time.perf_counter()
        scored = [self._score_one(request) for request in requests]
        timings = StageTimings(vision_s=time.perf_counter() - started)  # the call's, as specified
        return [replace(score, timings=timings) for score in scored]

    @staticmethod
    def _score_one(request: ScoreRequest) -> Score:
        frames = request.window.frames
        report = motion.analyse(frames)
        significance = motion.significance_of(report.peak)
        threshold = request.describe_threshold()
        skip = threshold is not None and significance < threshold
        description = "" if skip else motion.describe(report, frames)
        return Score(
            significance=significance,
            description=description,
            raw=f"peak={report.peak:.4f} cut={report.scene_cut}",
            best_frame=report.peak_index,
        )

    def describe(self) -> str:
        """One line for logs."""
        return "motion (frame differences, no model)"

    def close(self) -> None:
        """Nothing to release."""
