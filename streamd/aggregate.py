"""EventAggregator: scores of overlapping windows -> events with a lifecycle (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from streamd.domain import Event, EventType, Score, Window

HYSTERESIS = 1
"""An open event stays open on windows scoring up to this much below ``min_significance``."""


@dataclass(slots=True)
class _Open:
    id: str
    start_s: float
    end_s: float
    wall_start_s: float
    wall_end_s: float
    significance: int
    peak: int
    description: str
    windows: int
    best_window: int
    best_frame: int


class EventAggregator:
    """One stream's event state machine.

    * ``new`` when a window scores at or above ``min_significance`` (outside the cooldown);
    * ``update`` for each later window that keeps it going (scores at or above
      ``min_significance - HYSTERESIS``): the span grows, the peak and its description follow
      the best window;
    * ``end`` at the first quiet window that no longer overlaps the event's span (so one moment
      seen by several overlapping windows is one event), or when the stream stops;
    * after an end, no new event for ``cooldown_s`` of stream time.

    An unreadable score (``None``) counts as quiet: it can end an event, never open one.
    ``seq`` numbers every message of the stream without gaps, from ``last_seq + 1`` (1 for a
    stream new to the store).
    """

    def __init__(
        self, stream: str, min_significance: int, cooldown_s: float, last_seq: int = 0
    ) -> None:
        self.stream = stream
        self.min_significance = min_significance
        self.cooldown_s = cooldown_s
        self._open: _Open | None = None
        self._cooldown_until = float("-inf")
        self._seq = last_seq
        self._events = 0

    def observe(self, window: Window, score: Score) -> list[Event]:
        """Feed one scored window (in window order); returns the messages it causes."""
        significance = score.significance
        current = self._open
        if current is None:
            if significance is None or significance < self.min_significance:
                return []
            if window.start_s < self._cooldown_until:
                return []
            return [self._start(window, score, significance)]
        if significance is not None and significance >= self.min_significance - HYSTERESIS:
            self._extend(current, window, score, significance)
            return [self._message(EventType.UPDATE, current)]
        if window.start_s >= current.end_s:
            return [self._end()]
        return []

    def finish(self) -> list[Event]:
        """The stream stopped: end the open event, if any."""
        return [self._end()] if self._open is not None else []

    def _start(self, window: Window, score: Score, significance: int) -> Event:
        self._events += 1
        self._open = _Open(
            id=f"{window.wall_start_s:.6f}-{self.stream}-{self._events}",
            start_s=window.start_s,
            end_s=window.end_s,
            wall_start_s=window.wall_start_s,
            wall_end_s=window.wall_end_s,
            significance=significance,
            peak=significance,
            description=score.description,
            windows=1,
            best_window=window.seq,
            best_frame=score.best_frame,
        )
        return self._message(EventType.NEW, self._open)

    @staticmethod
    def _extend(current: _Open, window: Window, score: Score, significance: int) -> None:
        if window.end_s > current.end_s:
            current.end_s = window.end_s
            current.wall_end_s = window.wall_end_s
        current.significance = significance
        current.windows += 1
        better = significance > current.peak
        if better or (significance == current.peak and not current.description):
            current.peak = significance
            current.description = score.description or current.description
            current.best_window = window.seq
            current.best_frame = score.best_frame

    def _end(self) -> Event:
        current = self._open
        assert current is not None  # noqa: S101 - callers check
        self._open = None
        self._cooldown_until = current.end_s + self.cooldown_s
        return self._message(EventType.END, current)

    def _message(self, kind: EventType, current: _Open) -> Event:
        self._seq += 1
        return Event(
            type=kind,
            id=current.id,
            stream=self.stream,
            seq=self._seq,
            start_s=current.start_s,
            end_s=current.end_s,
            wall_start_s=current.wall_start_s,
            wall_end_s=current.wall_end_s,
            significance=current.significance,
            peak_significance=current.peak,
            description=current.description,
            windows=current.windows,
            best_window=current.best_window,
            best_frame=current.best_frame,
        )
