"""Cut overlapping windows from a stream's sampled frames (pure)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from streamd.domain import Frame, Window

_EPS = 1e-9


class Windower:
    """Turns sampled frames into windows of ``window_s`` starting every ``stride_s``.

    The grid starts at the first frame's time: window ``k`` spans
    ``[origin + k*stride_s, origin + k*stride_s + window_s)``. A window is cut as soon as a
    frame at or past its end arrives, so a live window leaves at most one sample period after
    its end. Memory is bounded: only frames of windows not yet cut are held (about
    ``window_s * sample_fps`` frames). Spans without frames (a gap in the source) produce no
    window, in constant time however long the gap.

    ``flush`` is called at the end of a file or when a live source is lost: it cuts the
    remaining windows, marked ``partial``, until every buffered frame was in some window, so
    the tail of a file is analysed rather than lost, without redundant tail windows.
    """

    def __init__(self, stream: str, window_s: float, stride_s: float) -> None:
        if not 0 < stride_s <= window_s:
            raise ValueError("need 0 < stride_s <= window_s")
        self.stream = stream
        self.window_s = window_s
        self.stride_s = stride_s
        self._frames: deque[Frame] = deque()
        self._origin: float | None = None
        self._k = 0
        self._seq = 0
        self._covered_until = -math.inf  # pts of the newest frame already in a cut window

    @property
    def buffered(self) -> int:
        """Frames held for windows not yet cut."""
        return len(self._frames)

    def _start(self, k: int) -> float:
        assert self._origin is not None  # noqa: S101 - callers set it first
        return self._origin + k * self.stride_s

    def push(self, frame: Frame) -> list[Window]:
        """Add a frame (times must increase); return the windows it completes."""
        if self._origin is None:
            self._origin = frame.pts_s
        out: list[Window] = []
        while frame.pts_s >= self._start(self._k) + self.window_s - _EPS:
            if not self._frames:
                # Nothing buffered: every window ending at or before this frame is empty.
                empty_span = frame.pts_s - self._start(self._k) - self.window_s
                skip = math.floor(empty_span / self.stride_s)
                self._k += max(skip, 0) + 1
                continue
            window = self._cut(self._start(self._k), self._start(self._k) + self.window_s)
            if window is not None:
                out.append(window)
            self._advance()
        self._frames.append(frame)
        return out

    def flush(self, end_s: float | None = None) -> list[Window]:
        """Cut what is left (end of file, lost source) and start a new grid at the next frame.

        Args:
            end_s: Where the stream's content ends; tail windows are clipped to it.
        """
        out: list[Window] = []
        while self._frames and self._frames[-1].pts_s > self._covered_until:
            start = self._start(self._k)
            end = start + self.window_s
            if end_s is not None:
                end = max(min(end, end_s), self._frames[-1].pts_s + _EPS)
            window = self._cut(start, end, partial=True)
            if window is not None:
                out.append(window)
            self._advance()
        self._frames.clear()
        self._origin = None
        self._k = 0
        return out

    def _cut(self, start: float, end: float, partial: bool = False) -> Window | None:
        frames = tuple(f for f in self._frames if start - _EPS <= f.pts_s < end - _EPS)
        if not frames:
            return None
        self._seq += 1
        self._covered_until = max(self._covered_until, frames[-1].pts_s)
        first = frames[0]
        return Window(
            stream=self.stream,
            seq=self._seq,
            start_s=start,
            end_s=end,
            frames=frames,
            wall_start_s=first.wall_s - (first.pts_s - start),
            partial=partial,
        )

    def _advance(self) -> None:
        self._k += 1
        next_start = self._start(self._k)
        while self._frames and self._frames[0].pts_s < next_start - _EPS:
            self._frames.popleft()


def cut_all(stream: str, frames: Iterable[Frame], window_s: float, stride_s: float) -> list[Window]:
    """Every window of a finite sequence of frames, tail included (for tests and tools)."""
    windower = Windower(stream, window_s, stride_s)
    out: list[Window] = []
    for frame in frames:
        out.extend(windower.push(frame))
    out.extend(windower.flush())
    return out
