"""ModelRunner: owns the backend on one thread and serves every stream's windows fairly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from streamd.domain import Frame, Score, ScoreRequest
from streamd.errors import ModelError
from streamd.metrics import Metrics
from streamd.scoring.base import ScoringBackend

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 1800.0
"""Loading may include a first download of the weights; beyond this something is wrong."""
CLOSE_TIMEOUT_S = 10.0
"""Releasing the model (freeing device memory) should take well under this."""
AHEAD_FRAMES = 64
"""Frames waiting to be encoded ahead of their windows; the oldest go first past this."""
AHEAD_CALL_S = 0.5
"""An encode-ahead call takes about this long at most, so a window that arrives meanwhile
waits little: the number of frames per call follows the measured seconds per frame."""


@dataclass(slots=True)
class _Job:
    request: ScoreRequest
    future: asyncio.Future[Score]
    enqueued: float = field(default_factory=time.monotonic)


class ModelRunner:
    """The one place the model runs.

    The backend is loaded, warmed up and called on dedicated threads (``streamd-model``), so
    the event loop never blocks on inference. An in-process model takes one call at a time
    (``max_in_flight`` 1: one thread, no locking needed); a remote one takes
    ``backend.max_in_flight`` calls at once, each answered as soon as it returns, so a slow
    request does not hold up the others. Each pipeline has at most one window waiting here at
    a time (its own mailbox holds the next), so serving the queue in arrival order is
    round-robin across streams; up to ``backend.max_batch`` waiting windows of different
    streams go in one call.

    A call that outlives ``timeout_s`` cannot be killed: the runner marks itself stalled, fails
    every waiter with ``ModelError`` and accepts nothing until the stuck call returns. With
    ``timeout_s`` None there is no such guard (``analyze``: a slow window is still progress).
    """

    def __init__(
        self,
        backend: ScoringBackend,
        metrics: Metrics,
        timeout_s: float | None,
        *,
        warm_up: bool = True,
        one_stream_batches: bool = False,
    ) -> None:
        self.backend = backend
        # One stream's consecutive windows may share a call (``analyze``: a file is the only
        # stream); live, a batch takes one window per stream, for fairness.
        self._one_stream_batches = one_stream_batches
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._warm_up = warm_up
        self._slots = max(1, backend.max_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._slots, thread_name_prefix="streamd-model"
        )
        self._queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self.ready = False
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stalled_since: float | None = None
        # The last call's failure when the backend named one for /healthz ("model server
        # unreachable"); None once a call succeeds.
        self.problem: str | None = None
        self._demand: list[Callable[[], bool]] = []
        self._ahead: deque[Frame] = deque()
        self._ahead_frame_s = AHEAD_CALL_S  # until measured: one frame a call
        metrics.model_calls_in_flight.set_function(lambda: len(self._calls))

    def add_demand(self, waiting: Callable[[], bool]) -> None:
        """Register a place where windows wait before they reach the runner.

        ``waiting()`` (called from model threads: a cheap, lock-free read) says whether a window
        is waiting there now; a live pipeline registers its mailbox.
        """
        self._demand.append(waiting)

    def offer_frame(self, frame: Frame) -> None:
        """A frame that future windows will hold: encode it when no window waits.

        A no-op unless the backend has per-frame work (``encodes_ahead``). Bounded: past
        ``AHEAD_FRAMES`` the oldest offer is dropped (counted); its window encodes it.
        """
        if not self.ready or not self.backend.encodes_ahead:
            return
        if len(self._ahead) >= AHEAD_FRAMES:
            self._ahead.popleft()
            self._metrics.vision_ahead.labels(outcome="dropped").inc()
        self._ahead.append(frame)
        self._wake.set()

    def has_spare_time(self) -> bool:
        """Whether no window waits for the model: none queued here, none in a registered place.

        A quiet window's description (``ScoreRequest.spare``) is then free: it delays nobody.
        Safe from any thread: reads of a deque's length and of the registered flags.
        """
        return not self._queue and not any(waiting() for waiting in self._demand)

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> ModelRunner:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        """Load and warm up the model on its thread; raises ``ModelError`` on failure."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(load_timeout_s):
                await loop.run_in_executor(self._executor, self._load)
        except TimeoutError as exc:
            raise ModelError(
                f"{self.backend.model_id}: not loaded after {load_timeout_s:.0f}s"
            ) from exc
        self.ready = True
        self._metrics.model_ready.set(1)
        logger.info("model ready: %s (%.1fs)", self.backend.describe(), time.monotonic() - started)

    def _load(self) -> None:
        self.backend.load()
        if self._warm_up:
            self.backend.warm_up()

    async def close(self) -> None:
        """Fail waiters, release the model and the thread (without waiting for a stuck call)."""
        self.ready = False
        self._metrics.model_ready.set(0)
        self._fail_queue(ModelError("model runner closed"))
        busy = any(not call.done() for call in self._calls)
        for task in self._tasks:
            task.cancel()
        if not busy:  # a call still running (stuck, or cut short by shutdown) keeps the thread
            await self._close_backend()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _close_backend(self) -> None:
        # Closing is best effort (we are going away anyway), but never silent.
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await loop.run_in_executor(self._executor, self.backend.close)
        except TimeoutError:
            logger.warning(
                "model %s not released within %.0fs", self.backend.model_id, CLOSE_TIMEOUT_S
            )
        except Exception as exc:  # any backend error: report it, carry on closing
            logger.warning("model %s failed to close: %r", self.backend.model_id, exc)

    # --- serving ------------------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> Score:
        """Score one window; raises ``ModelError`` if the model failed or is stalled."""
        if self.stalled_since is not None:
            raise ModelError("model stalled")
        if not self.ready:
            raise ModelError("model not ready")
        future: asyncio.Future[Score] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(request, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """The scheduler task: take waiting windows in arrival order, batch, score, answer."""
        while True:
            while (
                not (self._queue or self._ahead)
                or self.stalled_since is not None
                or len(self._tasks) >= self._slots
            ):
                self._wake.clear()
                await self._wake.wait()
            batch = self._take_batch()
            if batch:
                call = self._serve(batch)
            elif not self._queue and self._ahead:  # nothing waits: encode frames ahead
                call = self._serve_ahead(self._take_ahead())
            else:
                continue
            task = asyncio.create_task(call, name="streamd.model.call")
            self._tasks.add(task)
            task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()  # a slot is free

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        streams: set[str] = set()
        for job in list(self._queue):
            if len(batch) >= self.backend.max_batch:
                break
            if job.future.done():  # the waiter went away (shutdown)
                self._queue.remove(job)
                continue
            if job.request.window.stream in streams and not self._one_stream_batches:
                continue  # one window per stream per batch: fairness
            streams.add(job.request.window.stream)
            batch.append(job)
            self._queue.remove(job)
        if batch and self._ahead:  # a window's own call encodes its frames: not ahead of it
            last = {
                job.request.window.stream: job.request.window.frames[-1].index
                for job in batch
                if job.request.window.frames
            }
            self._ahead = deque(
                frame for frame in self._ahead if frame.index > last.get(frame.stream, -1)
            )
        return batch

    def _take_ahead(self) -> list[Frame]:
        count = max(1, int(AHEAD_CALL_S / max(self._ahead_frame_s, 1e-6)))
        return [self._ahead.popleft() for _ in range(min(count, len(self._ahead)))]

    async def _serve_ahead(self, frames: list[Frame]) -> None:
        """Encode ``frames`` ahead of their windows; a failure is left to their windows."""
        call = self._executor.submit(self.backend.encode_ahead, frames)
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                encoded = await asyncio.wrap_future(call)
        except TimeoutError:
            self._metrics.model_errors.labels(reason="stalled").inc()
            self._stall(call, [])
            return
        except Exception as exc:  # the windows' own calls report it
            logger.debug("encoding %d frames ahead failed: %s", len(frames), exc)
            return
        if encoded:
            self._ahead_frame_s = (time.monotonic() - started) / encoded
            self._metrics.vision_ahead.labels(outcome="encoded").inc(encoded)
            self._metrics.vision_cache_misses.inc(encoded)

    async def _serve(self, batch: list[_Job]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for job in batch:
            self._metrics.stage_seconds.labels(stage="queue").observe(now - job.enqueued)
        requests = [job.request for job in batch]
        call = self._executor.submit(self.backend.score, requests)
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                scores = await asyncio.wrap_future(call, loop=loop)
        except TimeoutError:
            self._metrics.model_errors.labels(reason="stalled").inc()
            self._stall(call, batch)
            return
        except ModelError as exc:  # the backend's own one-line account; pipelines log it
            self._metrics.model_errors.labels(reason=exc.reason).inc()
            self.problem = exc.health
            for job in batch:
                _fail(job, exc)
            return
        except Exception as exc:  # a bug or an unexpected library error: the traceback helps
            logger.exception("model failed on %d window(s)", len(batch))
            self._metrics.model_errors.labels(reason="error").inc()
            for job in batch:
                _fail(job, ModelError(f"model failed: {exc}"))
            return
        finally:
            self._metrics.model_call_seconds.observe(time.monotonic() - started)
        self.problem = None
        if len(scores) != len(batch):
            for job in batch:
                _fail(job, ModelError("backend returned the wrong number of scores"))
            return
        self._observe(scores)
        for job, result in zip(batch, scores, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _observe(self, scores: list[Score]) -> None:
        # Stage seconds are per model call (shared by a batch's windows): observe them once.
        timings = scores[0].timings
        stage = self._metrics.stage_seconds
        stage.labels(stage="vision").observe(timings.vision_s)
        stage.labels(stage="prefill").observe(timings.prefill_s)
        stage.labels(stage="generate").observe(timings.generate_s)
        self._metrics.vision_cache_hits.inc(sum(s.timings.vision_hits for s in scores))
        self._metrics.vision_cache_misses.inc(sum(s.timings.vision_misses for s in scores))
        tokens = self._metrics.model_tokens
        tokens.labels(type="prompt").inc(sum(s.timings.prompt_tokens for s in scores))
        tokens.labels(type="completion").inc(sum(s.timings.completion_tokens for s in scores))

    def _stall(self, call: concurrent.futures.Future[Any], batch: list[_Job]) -> None:
        self.stalled_since = time.monotonic()
        logger.error(
            "model stalled: no answer within %.0fs; refusing windows until it returns",
            self.timeout_s,
        )
        error = ModelError(f"model stalled (> {self.timeout_s:.0f}s)")
        for job in batch:
            _fail(job, error)
        self._fail_queue(error)
        loop = asyncio.get_running_loop()

        def returned(_call: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to recover
                loop.call_soon_threadsafe(self._recover)

        call.add_done_callback(returned)

    def _recover(self) -> None:
        if self.stalled_since is not None:
            logger.warning(
                "model answered again after %.0fs stalled", time.monotonic() - self.stalled_since
            )
            self.stalled_since = None
            self._wake.set()

    def _fail_queue(self, error: ModelError) -> None:
        while self._queue:
            _fail(self._queue.popleft(), error)


def _fail(job: _Job, error: ModelError) -> None:
    if not job.future.done():
        job.future.set_exception(error)
