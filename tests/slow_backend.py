"""Latency and failure injection at the model boundary (tests only): wraps the motion backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from streamd.domain import Score, ScoreRequest
from streamd.scoring.motion_impl import MotionBackend


class SlowBackend(MotionBackend):
    """The motion backend, ``delay_s`` slower per call; can hang or raise on demand."""

    name = "slow-motion"

    def __init__(self, delay_s: float = 0.0, max_batch: int = 1, max_in_flight: int = 1) -> None:
        super().__init__()
        self.delay_s = delay_s
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self.barrier: threading.Barrier | None = None
        self.calls: list[list[str]] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self.fail_next = False
        self.closed = False

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        self.calls.append([r.window.stream for r in requests])
        if self.barrier is not None:  # only passes when that many calls run at once
            self.barrier.wait(5)
        if self.hang.is_set():
            self.release.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        time.sleep(self.delay_s)
        return super().score(requests)

    def close(self) -> None:
        self.closed = True
