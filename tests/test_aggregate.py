from __future__ import annotations

from streamd.aggregate import EventAggregator
from streamd.domain import Event, EventType, Score
from tests.frames import window


def run(
    scores: list[int | None],
    window_s: float = 8,
    stride_s: float = 4,
    cooldown_s: float = 0,
    finish: bool = False,
) -> list[Event]:
    agg = EventAggregator("cam", min_significance=6, cooldown_s=cooldown_s)
    events: list[Event] = []
    for i, significance in enumerate(scores):
        start = i * stride_s
        text = f"window {i + 1}" if significance is not None else ""
        events += agg.observe(window(i + 1, start, start + window_s), Score(significance, text, ""))
    if finish:
        events += agg.finish()
    return events


def kinds(events: list[Event]) -> list[str]:
    return [e.type.value for e in events]


def test_quiet_stream_has_no_events() -> None:
    assert run([1, 2, 5, 3, None, 1]) == []


def test_one_moment_seen_by_overlapping_windows_is_one_event() -> None:
    events = run([1, 8, 9, 7, 2, 1, 1])
    assert kinds(events) == ["new", "update", "update", "end"]
    assert len({e.id for e in events}) == 1
    assert [e.seq for e in events] == [1, 2, 3, 4]
    end = events[-1]
    assert (end.start_s, end.end_s) == (4, 20)  # windows 2-4
    assert end.peak_significance == 9
    assert end.description == "window 3"  # the peak's
    assert end.windows == 3
    assert end.best_window == 3


def test_end_waits_for_a_quiet_window_past_the_span() -> None:
    # Window 3 (8-16) overlaps the event (4-12): not yet the end; window 4 (12-20) is.
    events = run([1, 8, 1, 1])
    assert kinds(events) == ["new", "end"]
    assert events[-1].end_s == 12


def test_hysteresis_keeps_the_event_open() -> None:
    events = run([8, 5, 5, 8, 1, 1, 1])
    assert kinds(events) == ["new", "update", "update", "update", "end"]
    assert events[-1].peak_significance == 8
    assert events[-1].significance == 8


def test_below_the_band_ends_it() -> None:
    events = run([8, 4, 4, 4, 8, 1, 1, 1])
    assert kinds(events) == ["new", "end", "new", "end"]
    assert events[0].id != events[2].id
    assert [e.seq for e in events] == [1, 2, 3, 4]


def test_cooldown_blocks_new_events() -> None:
    # First event ends at 8 (window 1 = 0-8); cooldown 10 -> nothing starting before 18.
    events = run([8, 1, 1, 8, 8, 1, 1, 8, 1, 1], cooldown_s=10)
    assert kinds(events) == ["new", "end", "new", "end"]
    assert events[2].start_s == 28  # window 8


def test_unreadable_score_never_opens_but_can_end() -> None:
    assert run([None, None]) == []
    assert kinds(run([8, None, None, None])) == ["new", "end"]


def test_finish_ends_an_open_event() -> None:
    events = run([1, 8, 9], finish=True)
    assert kinds(events) == ["new", "update", "end"]
    assert events[-1].end_s == 16


def test_finish_without_event_is_silent() -> None:
    assert run([1, 1], finish=True) == []


def test_event_ids_are_stable_and_distinct() -> None:
    events = run([8, 1, 1, 8, 1, 1])
    ids = [e.id for e in events]
    assert ids[0] == ids[1] != ids[2] == ids[3]
    assert ids[0].endswith("-cam-1")
    assert ids[2].endswith("-cam-2")
    assert events[0].type is EventType.NEW
