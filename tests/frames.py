"""Builders of in-memory frames and windows for tests of the pure modules."""

from __future__ import annotations

import numpy as np

from streamd.domain import Frame, Window

SIZE = 64


def solid(level: int, size: int = SIZE) -> np.ndarray:
    """A uniform grey picture."""
    return np.full((size, size, 3), level, dtype=np.uint8)


def bars(offset: int, size: int = SIZE, period: int = 16) -> np.ndarray:
    """Vertical black/white bars shifted by ``offset`` pixels."""
    x = (np.arange(size) + offset) % period < period // 2
    row = np.where(x, 255, 0).astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], size, axis=0), 3, axis=2)


def frame(index: int, pts_s: float, image: np.ndarray | None = None, stream: str = "cam") -> Frame:
    """A frame at ``pts_s`` (wall time 1000 + pts)."""
    return Frame(
        stream=stream,
        index=index,
        pts_s=pts_s,
        wall_s=1000.0 + pts_s,
        image=solid(0) if image is None else image,
        source_size=(SIZE, SIZE),
    )


def frames_at(times: list[float], stream: str = "cam") -> list[Frame]:
    """Black frames at the given times."""
    return [frame(i, t, stream=stream) for i, t in enumerate(times)]


def window(seq: int, start_s: float, end_s: float, stream: str = "cam", n: int = 2) -> Window:
    """A window of ``n`` black frames spread over ``[start_s, end_s)``."""
    step = (end_s - start_s) / n
    frames = tuple(frame(seq * 100 + i, start_s + i * step, stream=stream) for i in range(n))
    return Window(
        stream=stream,
        seq=seq,
        start_s=start_s,
        end_s=end_s,
        frames=frames,
        wall_start_s=1000.0 + start_s,
    )
