from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.domain import Window
from streamd.sampling import FrameSampler, Timeline
from streamd.window import Windower, cut_all
from tests.frames import frame, frames_at


def spans(windows: list[Window]) -> list[tuple[float, float]]:
    return [(w.start_s, w.end_s) for w in windows]


def test_exact_windows_for_a_20s_file() -> None:
    windows = cut_all("cam", frames_at([float(t) for t in range(20)]), window_s=8, stride_s=4)
    assert spans(windows) == [(0, 8), (4, 12), (8, 16), (12, 20)]
    assert [len(w.frames) for w in windows] == [8, 8, 8, 8]
    assert [w.seq for w in windows] == [1, 2, 3, 4]
    assert [f.pts_s for f in windows[1].frames] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert [w.partial for w in windows] == [False, False, False, True]


def test_tail_is_analysed_not_lost() -> None:
    windows = cut_all("cam", frames_at([float(t) for t in range(22)]), window_s=8, stride_s=4)
    assert spans(windows)[-1] == (16, 24)
    assert windows[-1].frames[-1].pts_s == 21
    assert windows[-1].partial
    covered = {f.pts_s for w in windows for f in w.frames}
    assert covered == {float(t) for t in range(22)}


def test_flush_clips_the_tail_to_the_content() -> None:
    windower = Windower("cam", 8, 4)
    for f in frames_at([float(t) for t in range(10)]):
        windower.push(f)
    tail = windower.flush(end_s=10.0)
    assert spans(tail) == [(4, 10)]


def test_short_clip_gives_one_partial_window() -> None:
    windows = cut_all("cam", frames_at([0.0, 1.0, 2.0]), window_s=8, stride_s=4)
    assert spans(windows) == [(0, 8)]
    assert windows[0].partial


def test_window_is_cut_when_a_frame_reaches_its_end() -> None:
    windower = Windower("cam", 4, 2)
    out = [windower.push(f) for f in frames_at([0, 1, 2, 3])]
    assert all(not cut for cut in out)
    cut = windower.push(frame(4, 4.0))
    assert spans(cut) == [(0, 4)]


def test_gap_skips_empty_windows_in_constant_time() -> None:
    windower = Windower("cam", 4, 2)
    for f in frames_at([0, 1, 2, 3]):
        windower.push(f)
    cut = windower.push(frame(4, 1e9))  # a camera that came back after 30 years
    assert spans(cut) == [(0, 4), (2, 6)]
    assert windower.buffered == 1
    after = [w for i in range(4) for w in windower.push(frame(5 + i, 1e9 + 1 + i))]
    assert spans(after) == [(1e9 - 2, 1e9 + 2), (1e9, 1e9 + 4)]
    assert [f.pts_s for f in after[0].frames] == [1e9, 1e9 + 1]


def test_flush_resets_the_grid_for_a_reconnect() -> None:
    windower = Windower("cam", 4, 2)
    for f in frames_at([0, 1, 2, 3, 4, 5]):
        windower.push(f)
    windower.flush(end_s=6.0)
    cut = [w for f in (frame(10, 20.0), frame(11, 24.5)) for w in windower.push(f)]
    assert spans(cut) == [(20, 24)]
    assert cut[0].seq > 2


def test_wall_times_follow_the_frames() -> None:
    (window, *_) = cut_all("cam", frames_at([0.5, 1.5, 2.5, 3.5, 4.5]), 2, 2)
    assert window.start_s == 0.5
    assert window.wall_start_s == pytest.approx(1000.5)
    assert window.wall_end_s == pytest.approx(1002.5)


def test_bad_shape_rejected() -> None:
    with pytest.raises(ValueError, match="stride"):
        Windower("cam", 2, 3)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=120),
    fps=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    window_s=st.integers(min_value=1, max_value=20),
    stride_frac=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
)
def test_properties(n: int, fps: float, window_s: int, stride_frac: float) -> None:
    stride_s = window_s * stride_frac
    if window_s * fps < 1:
        return
    times = [i / fps for i in range(n)]
    windows = cut_all("cam", frames_at(times), window_s, stride_s)
    # Every frame is analysed, windows are on the grid, frames inside their span, seq gap-free.
    assert {f.pts_s for w in windows for f in w.frames} == set(times)
    assert [w.seq for w in windows] == list(range(1, len(windows) + 1))
    for w in windows:
        k = w.start_s / stride_s
        assert math.isclose(k, round(k), abs_tol=1e-9)
        assert all(w.start_s - 1e-9 <= f.pts_s < w.end_s for f in w.frames)
        assert w.end_s - w.start_s <= window_s + 1e-9
        assert len(w.frames) <= math.ceil(window_s * fps) + 1
    full = [w for w in windows if not w.partial]
    assert len(full) == max(0, math.floor((times[-1] - window_s) / stride_s + 1e-9) + 1)
    # No redundant tail window: each window adds a frame the previous ones did not have.
    seen: set[float] = set()
    for w in windows:
        new = {f.pts_s for f in w.frames} - seen
        assert new or not w.partial
        seen |= new


# --- sampling ----------------------------------------------------------------------------------


def test_sampler_keeps_first_frame_of_each_slot() -> None:
    sampler = FrameSampler(1.0)
    times = [i / 10 for i in range(35)]
    kept = [t for t in times if sampler.offer(t)]
    assert kept == [0.0, 1.0, 2.0, 3.0]


def test_sampler_above_source_rate_keeps_everything() -> None:
    sampler = FrameSampler(30.0)
    times = [i / 10 for i in range(20)]
    assert all(sampler.offer(t) for t in times)


def test_sampler_refuses_time_going_back() -> None:
    sampler = FrameSampler(1.0)
    assert sampler.offer(5.0)
    assert not sampler.offer(4.0)
    assert not sampler.offer(5.5)
    assert sampler.offer(6.0)


def test_timeline_first_frame_without_pts() -> None:
    timeline = Timeline(frame_period_s=0.1)
    first = timeline.resolve(None)  # RTSP's first frame
    rest = [timeline.resolve(t) for t in (12.3, 12.4, 12.5)]
    assert first == 0.0
    assert rest == pytest.approx([0.1, 0.2, 0.3])


def test_timeline_missing_pts_mid_stream_is_one_period_on() -> None:
    timeline = Timeline(frame_period_s=0.04)
    assert timeline.resolve(1.0) == 0.0
    assert timeline.resolve(None) == pytest.approx(0.04)
    assert timeline.resolve(1.08) == pytest.approx(0.08)


def test_timeline_origin_and_base() -> None:
    timeline = Timeline(0.1, base_s=100.0, origin=1.4)
    assert timeline.resolve(1.4) == pytest.approx(100.0)
    assert timeline.resolve(2.4) == pytest.approx(101.0)


def test_timeline_rebases_a_clock_reset() -> None:
    timeline = Timeline(0.1, live=True)
    assert timeline.resolve(50.0) == 0.0
    assert timeline.resolve(50.1) == pytest.approx(0.1)
    assert timeline.resolve(0.0) == pytest.approx(0.2)  # camera clock reset: continue
    assert timeline.resolve(0.1) == pytest.approx(0.3)
    assert timeline.resolve(5000.0) == pytest.approx(0.4)  # live jump forward: continue
    assert timeline.rebases == 2


def test_timeline_keeps_file_gaps() -> None:
    timeline = Timeline(0.1, live=False)
    timeline.resolve(0.0)
    assert timeline.resolve(500.0) == pytest.approx(500.0)
