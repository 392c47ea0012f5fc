"""The scoring seam: what every backend (transformers, mlx, motion, a remote server) provides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from streamd.domain import Frame, Score, ScoreRequest


@runtime_checkable
class ScoringBackend(Protocol):
    """A model that turns windows into scores.

    Every method except the properties is blocking and is called from the one model thread
    (``ModelRunner``), never from the event loop: implementations need no locking.
    """

    name: str
    """Backend name as in the config (``transformers``, ``mlx``, ``motion``)."""
    model_id: str
    """What was loaded: hub id or local directory (``motion`` for the motion backend)."""

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)`` the frames must be resized to; valid after ``load``."""
        ...

    @property
    def max_batch(self) -> int:
        """How many windows one ``score`` call takes at most (1: no batching)."""
        ...

    @property
    def max_in_flight(self) -> int:
        """How many ``score`` calls may run at once, each on its own thread.

        1 for an in-process model (one call at a time, on one thread); a remote server takes
        several and batches them itself.
        """
        ...

    @property
    def encodes_ahead(self) -> bool:
        """Whether ``encode_ahead`` does anything (a per-frame vision cache to fill)."""
        ...

    def load(self) -> None:
        """Load weights; raise ``ModelError`` with a message naming the model and a fix."""
        ...

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        """Run the per-frame work (the vision encoder) for frames whose windows are not cut yet.

        Called when no window waits, so a window's frames are ready when it is cut. Returns how
        many frames were encoded (frames already cached cost nothing).
        """
        ...

    def warm_up(self) -> None:
        """Run one throwaway window so the first real one pays no one-off cost."""
        ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score up to ``max_batch`` windows; one ``Score`` per request, in order."""
        ...

    def describe(self) -> str:
        """One line for logs: model, device, dtype."""
        ...

    def close(self) -> None:
        """Release the model (memory, device)."""
        ...


class NothingAhead:
    """For backends with no per-frame work to do before a window is cut."""

    @property
    def encodes_ahead(self) -> bool:
        """Nothing to encode ahead: the runner never calls ``encode_ahead``."""
        return False

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        """Nothing to encode ahead."""
        return 0
