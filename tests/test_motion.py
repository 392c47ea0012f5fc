from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamd import motion
from streamd.config import StreamConfig
from streamd.domain import Score, ScoreRequest, Window
from streamd.scoring.motion_impl import MotionBackend
from streamd.scoring.prompt import PROFILES
from streamd.window import Windower
from tests.frames import bars, frame, solid
from tests.pipelines import run_pipeline


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


# --- the thumbnail behind the gate ------------------------------------------------------------


def test_a_small_object_between_strided_pixels_still_changes_its_cell() -> None:
    before = np.full((512, 512, 3), 100, np.uint8)
    after = before.copy()
    after[3:7, 3:7] = 255  # 4x4 px, off the 8-px stride: a distant object
    report = motion.analyse(make_window([before, after]).frames)
    assert report.peak == 1 / motion.GRID**2  # exactly its one cell


def test_sensor_noise_averages_out() -> None:
    rng = np.random.default_rng(0)
    base = np.full((512, 512, 3), 100.0)
    noisy = [np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in "ab"]
    assert motion.analyse(make_window(noisy).frames).peak == 0  # +-12 levels a pixel


# --- the surveillance default on real video ---------------------------------------------------

CLIP_S, FPS, SIZE = 32, 10, (160, 90)
EVENT_S = (20.3, 23.3)
"""A person-sized figure crosses then; windows (8 s every 4 s) at 16 and 20 s overlap it."""


def write_scene(path: Path) -> None:
    """A textured still scene with sensor noise, H.264 at a camera's bitrate, one crossing."""
    width, height = SIZE
    rng = np.random.default_rng(3)
    coarse = rng.integers(60, 190, (height // 6 + 1, width // 6 + 1)).astype(np.int16)
    scene = np.kron(coarse, np.ones((6, 6), np.int16))[:height, :width]
    noise = [rng.normal(0, 3, (height, width)).astype(np.int16) for _ in range(7)]
    chroma = np.full((height // 2, width), 128, np.uint8)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=FPS,
            options={"preset": "ultrafast", "threads": "1", "bf": "0", "b": "150k"},
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        for index in range(CLIP_S * FPS):
            t = index / FPS
            luma = scene.copy()
            progress = (t - EVENT_S[0]) / (EVENT_S[1] - EVENT_S[0])
            if 0 <= progress <= 1:  # 8x20 px (5% x 22%): a person across the yard
                x = round(10 + progress * (width - 28))
                luma[55:75, x : x + 8] = 30
            luma = np.clip(luma + noise[index % len(noise)], 16, 235).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.concatenate([luma, chroma]), format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def crossing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("motion") / "crossing.mp4"
    write_scene(path)
    return path


class Recorder(MotionBackend):
    """The motion backend, noting the start of every window it scores."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[float] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        self.starts.extend(r.window.start_s for r in requests)
        return super().score(requests)


async def run_defaults(url: str, **stream: object) -> tuple[CollectorRegistry, list[float]]:
    """The pipeline over a file at the stream defaults (8 s windows every 4 s, 1 fps)."""
    backend = Recorder()
    config = StreamConfig.model_validate({"name": "cam", "url": url, **stream})
    return await run_pipeline(config, backend), backend.starts


@pytest.mark.parametrize(
    ("stream", "analysed"),
    [
        ({}, [16.0, 20.0]),  # surveillance, motion_gate auto: only the crossing's windows
        ({"profile": "sports"}, [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0]),  # auto is off there
        ({"motion_gate": 0}, [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0]),  # explicitly off
    ],
)
async def test_default_surveillance_gate_skips_static_windows_only(
    crossing: Path, stream: dict[str, object], analysed: list[float]
) -> None:
    registry, starts = await run_defaults(str(crossing), **stream)

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"stream": "cam", **labels}) or 0.0

    assert value("streamd_windows_total") == 7  # 32 s: windows at 0, 4, ... 24 s
    assert sorted(starts) == analysed
    assert value("streamd_windows_analyzed_total") == len(analysed)
    gated = value("streamd_windows_dropped_total", reason="motion_gate")
    assert gated == 7 - len(analysed)


# --- MotionWatch: which frames of a gated live stream are encoded ahead ----------------------


def watch_offers(images: list[np.ndarray], gate: float = 0.01, window_s: float = 8.0) -> list[int]:
    """Indexes offered by a ``MotionWatch`` fed one frame a second, in the order offered."""
    watch = motion.MotionWatch(gate, window_s)
    return [f.index for i, img in enumerate(images) for f in watch.push(frame(i, float(i), img))]


def test_watch_offers_nothing_on_a_static_scene() -> None:
    noisy = [solid(100 + (i % 2) * 10) for i in range(40)]  # sensor noise, under the threshold
    assert watch_offers(noisy) == []


def test_watch_offers_the_window_before_and_after_motion() -> None:
    moved = solid(30)
    moved[:16, :16] = 220  # something appears at 10 s and stays
    images = [solid(30)] * 10 + [moved] * 20
    # The pair (9, 10) moved: the 8 s before it that were held back, then 8 s of new frames.
    assert watch_offers(images) == list(range(3, 18))


def test_watch_restarts_when_time_goes_back() -> None:
    watch = motion.MotionWatch(0.01, 8.0)
    for i in range(5):
        assert watch.push(frame(i, float(i), solid(0))) == []
    # A looped file: its first frame again, unlike the last one, is no motion.
    assert watch.push(frame(5, 0.0, solid(255))) == []
    assert [f.index for f in watch.push(frame(6, 1.0, solid(0)))] == [5, 6]


def test_watch_needs_a_gate() -> None:
    with pytest.raises(ValueError, match="gate"):
        motion.MotionWatch(0.0, 8.0)


@pytest.mark.parametrize("seed", range(5))
def test_watch_offers_every_frame_a_passing_window_holds(seed: int) -> None:
    """Against the gate itself: each window that passes had all of its frames offered."""
    rng = np.random.default_rng(seed)
    levels = np.cumsum(rng.random(120) < 0.05) * 40 % 256  # a few jumps, static between
    images = [solid(int(level)) for level in levels]
    offered = set(watch_offers(images, gate=0.01))
    windower = Windower("cam", 8.0, 4.0)
    windows = [w for i, img in enumerate(images) for w in windower.push(frame(i, float(i), img))]
    passing = [w for w in windows if motion.analyse(w.frames).peak >= 0.01]
    assert passing, "the sequence should move somewhere"
    needed = {f.index for w in passing for f in w.frames}
    assert needed <= offered
    assert len(offered) < len(images)  # and static stretches stay unencoded
