from __future__ import annotations

import numpy as np

from streamd import motion
from streamd.domain import Score, ScoreRequest, Window
from streamd.scoring.motion_impl import MotionBackend
from streamd.scoring.prompt import PROFILES
from tests.frames import bars, frame, solid


def make_window(images: list[np.ndarray], seq: int = 1) -> Window:
    frames = tuple(frame(i, float(i), img) for i, img in enumerate(images))
    return Window("cam", seq, 0.0, float(len(images)), frames, 1000.0)


def score(images: list[np.ndarray], describe_below: int | None = None) -> Score:
    request = ScoreRequest(make_window(images), PROFILES["surveillance"], describe_below)
    return MotionBackend().score([request])[0]


def test_static_scores_one() -> None:
    result = score([solid(0)] * 8)
    assert result.significance == 1
    assert result.description == "No motion."


def test_scene_cut_outranks_static_and_small_motion() -> None:
    static = score([solid(30)] * 8)
    small = solid(30)
    small[:6, :6] = 200  # a small thing appears: ~1% of the picture
    little = score([solid(30)] * 4 + [small] * 4)
    cut = score([solid(0)] * 4 + [solid(255)] * 4)
    assert static.significance == 1
    assert little.significance is not None
    assert cut.significance is not None
    assert 1 < little.significance < cut.significance == 10
    assert "Scene cut at 0:04" in cut.description
    assert cut.best_frame == 4


def test_moving_bars_are_significant() -> None:
    result = score([bars(4 * i) for i in range(8)])
    assert result.significance is not None
    assert result.significance >= 6
    assert result.description.startswith("Motion in")


def test_noise_below_threshold_is_no_motion() -> None:
    frames = [solid(100 + (i % 2) * 10) for i in range(8)]  # +-10 levels: sensor noise
    assert score(frames).significance == 1


def test_significance_scale_is_monotonic() -> None:
    values = [motion.significance_of(p) for p in (0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0)]
    assert values == sorted(values)
    assert values[0] == 1
    assert values[-1] == 10
    assert motion.significance_of(0.05) == 6


def test_describe_below_skips_the_description() -> None:
    assert score([solid(0)] * 4, describe_below=6).description == ""


def test_single_frame() -> None:
    report = motion.analyse(make_window([solid(0)]).frames)
    assert report.peak == 0
    assert report.peak_index == 0
