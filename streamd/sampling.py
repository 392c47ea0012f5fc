"""Decoder timestamps -> stream time, and sampling by presentation time (pure)."""

from __future__ import annotations

import math

REBASE_BACKWARD_S = 1.0
"""A timestamp this far behind the previous one is a discontinuity (camera clock reset)."""
REBASE_FORWARD_S = 60.0
"""A jump this far ahead on a live source is a discontinuity, not a minute of lost video."""
_EPS = 1e-6


class Timeline:
    """Maps a decoder's frame times (which may be missing or jump) to monotonic stream seconds.

    One ``Timeline`` lives for one connection. ``base_s`` is the stream time the connection's
    first frame gets: 0 for a file, the seconds since the pipeline started for a live source
    (so stream time keeps running across reconnects).

    A frame without a timestamp (the first RTSP frame often has none) is placed one frame
    period after the previous frame; frames before the first timestamp are placed backwards
    from it once it arrives, so the grid stays consistent. ``origin`` is the decoder time that
    maps to ``base_s`` (a file's start time); by default, the first frame's.
    """

    def __init__(
        self,
        frame_period_s: float,
        base_s: float = 0.0,
        live: bool = False,
        origin: float | None = None,
    ) -> None:
        self.frame_period_s = frame_period_s if frame_period_s > 0 else 1 / 25
        self.base_s = base_s
        self.live = live
        self._origin = origin
        self._last_time: float | None = None
        self._last_pts: float | None = None
        self._untimed = 0
        self.rebases = 0

    def resolve(self, time: float | None) -> float:
        """Stream seconds of a frame whose decoder time is ``time`` (None when unknown)."""
        period = self.frame_period_s
        if time is None:
            if self._last_time is None:
                pts = self.base_s + self._untimed * period
                self._untimed += 1
                self._last_pts = pts
                return pts
            time = self._last_time + period
        if self._origin is None:
            self._origin = time - self._untimed * period
        elif self._last_time is not None and self._is_discontinuity(time - self._last_time):
            # Continue one period after the last frame instead of jumping.
            assert self._last_pts is not None  # noqa: S101 - set with _last_time
            self._origin = time - (self._last_pts + period - self.base_s)
            self.rebases += 1
        self._last_time = time
        pts = self.base_s + (time - self._origin)
        self._last_pts = pts
        return pts

    def offset_s(self) -> float | None:
        """Stream seconds minus decoder time, as now mapped (rebases included); None until known.

        Known from the start when ``origin`` is given (files), else from the first timestamped
        frame. Demuxed packets use it to land on the frames' clock.
        """
        return None if self._origin is None else self.base_s - self._origin

    def _is_discontinuity(self, step: float) -> bool:
        if step < -REBASE_BACKWARD_S:
            return True
        return self.live and step > REBASE_FORWARD_S


class FrameSampler:
    """Keeps the first frame of every ``1/sample_fps`` slot of stream time.

    Slots are counted from stream time 0, so a file sampled at 1 fps yields the frames at (or
    just after) 0 s, 1 s, 2 s... whatever the source frame rate; a sample rate above the source
    rate keeps every frame. A frame in a slot already served (or an earlier one) is refused.
    """

    def __init__(self, sample_fps: float) -> None:
        if sample_fps <= 0:
            raise ValueError("sample_fps must be > 0")
        self.sample_fps = sample_fps
        self._last_slot: int | None = None

    def offer(self, pts_s: float) -> bool:
        """Whether the frame at stream time ``pts_s`` is sampled."""
        slot = math.floor(pts_s * self.sample_fps + _EPS)
        if self._last_slot is not None and slot <= self._last_slot:
            return False
        self._last_slot = slot
        return True
