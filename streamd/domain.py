"""Hot-path value types shared by ingest, windows, scoring and events (pure, no I/O)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]
"""An RGB picture, shape ``(height, width, 3)``."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One sampled video frame, already resized to the model's input size.

    Attributes:
        stream: Name of the stream it came from.
        index: Per-stream counter of sampled frames; never reused, also across reconnects.
        pts_s: Presentation time in seconds from the start of the stream.
        wall_s: Unix time the frame shows (for files: when reading started, plus ``pts_s``).
        image: RGB pixels at the model's input size.
        source_size: ``(width, height)`` of the decoded picture, to undo the squash.
        source_jpeg: The picture at ``source_size`` as a JPEG, when the source was asked for
            full frames (event snapshots, the latest picture of a stream); else None.
    """

    stream: str
    index: int
    pts_s: float
    wall_s: float
    image: Image = field(repr=False, compare=False)
    source_size: tuple[int, int] = (0, 0)
    source_jpeg: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Window:
    """A span of sampled frames cut from one stream's buffer.

    Attributes:
        stream: Stream name.
        seq: Per-stream window number, from 1, in the order windows are cut.
        start_s: Start of the span, stream seconds (inclusive).
        end_s: End of the span, stream seconds (exclusive).
        frames: The sampled frames inside ``[start_s, end_s)``, oldest first.
        wall_start_s: Unix time of ``start_s``.
        partial: True for the last window of a file, which may hold fewer frames.
    """

    stream: str
    seq: int
    start_s: float
    end_s: float
    frames: tuple[Frame, ...]
    wall_start_s: float
    partial: bool = False

    @property
    def duration_s(self) -> float:
        """Length of the span in seconds."""
        return self.end_s - self.start_s

    @property
    def wall_end_s(self) -> float:
        """Unix time of ``end_s``."""
        return self.wall_start_s + self.duration_s


@dataclass(frozen=True, slots=True)
class Prompt:
    """What to ask the model about a window: a system prompt and a question."""

    system: str
    question: str


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """One window to score.

    Attributes:
        window: The frames.
        prompt: The profile's system prompt and question (after overrides).
        describe_below: If set, skip generating a description when the significance is below
            this value (saves the decode on quiet windows).
        spare: If set, asked once the score is known: True when the model has time to spare,
            and then a window below ``describe_below`` is described all the same.
    """

    window: Window
    prompt: Prompt
    describe_below: int | None = None
    spare: Callable[[], bool] | None = None

    def describe_threshold(self) -> int | None:
        """``describe_below``, or None (describe every window) if the model has time to spare.

        Backends ask when they are about to decide, so the answer is as fresh as it can be.
        """
        if self.describe_below is None or (self.spare is not None and self.spare()):
            return None
        return self.describe_below


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Where the time of the model call that scored a window went, and the window's cache use.

    The stage seconds are those of the whole ``score`` call: the same for every window of a
    batch, which waited for all of it. The hit and miss counts are this window's own.
    """

    vision_s: float = 0.0
    prefill_s: float = 0.0
    generate_s: float = 0.0
    vision_hits: int = 0
    vision_misses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Score:
    """The model's verdict on one window.

    Attributes:
        significance: 1-10, or None when the model's answer could not be read.
        description: One sentence about the window ("" when skipped).
        raw: The model's raw answer text, for logs and debugging.
        timings: Stage timings and cache counts.
        best_frame: Index into ``window.frames`` of the frame that best shows the window.
    """

    significance: int | None
    description: str
    raw: str
    timings: StageTimings = StageTimings()
    best_frame: int = 0


class SourceState(enum.Enum):
    """Lifecycle of a video source; see ``LEGAL_TRANSITIONS``."""

    STARTING = "starting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    STOPPED = "stopped"


LEGAL_TRANSITIONS: dict[SourceState, frozenset[SourceState]] = {
    SourceState.STARTING: frozenset(
        {SourceState.CONNECTED, SourceState.RECONNECTING, SourceState.ENDED, SourceState.STOPPED}
    ),
    SourceState.CONNECTED: frozenset(
        {SourceState.RECONNECTING, SourceState.ENDED, SourceState.STOPPED}
    ),
    SourceState.RECONNECTING: frozenset(
        {SourceState.CONNECTED, SourceState.ENDED, SourceState.STOPPED}
    ),
    SourceState.ENDED: frozenset({SourceState.STOPPED}),
    SourceState.STOPPED: frozenset(),
}


class EventType(enum.Enum):
    """The three messages of an event's lifecycle."""

    NEW = "new"
    UPDATE = "update"
    END = "end"


@dataclass(frozen=True, slots=True)
class Event:
    """One message of an event's lifecycle, as published on ``<prefix>/<stream>/events``.

    Attributes:
        type: new, update or end.
        id: Stable across the event's messages.
        stream: Stream name.
        seq: Per-stream message counter from 1, gap-free.
        start_s / end_s: Span covered, stream seconds.
        wall_start_s / wall_end_s: The same span as Unix times.
        significance: Score of the latest window that contributed.
        peak_significance: Highest score seen in the event.
        description: The description of the peak window.
        windows: How many windows contributed.
        best_window: Sequence number of the window holding the best frame.
        best_frame: Index into that window's frames.
    """

    type: EventType
    id: str
    stream: str
    seq: int
    start_s: float
    end_s: float
    wall_start_s: float
    wall_end_s: float
    significance: int
    peak_significance: int
    description: str
    windows: int
    best_window: int
    best_frame: int
