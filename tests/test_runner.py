from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from streamd.config import ModelConfig
from streamd.domain import Frame, Prompt, Score, ScoreRequest, Window
from streamd.errors import ModelError
from streamd.metrics import Metrics
from streamd.scoring import create_backend, resolve_backend_name
from streamd.scoring.base import ScoringBackend
from streamd.scoring.motion_impl import MotionBackend
from streamd.scoring.runner import AHEAD_FRAMES, ModelRunner
from tests.frames import bars, frame, window
from tests.slow_backend import SlowBackend
from tests.waiting import eventually

PROMPT = Prompt("", "?")


def request(stream: str, seq: int = 1) -> ScoreRequest:
    return ScoreRequest(window(seq, 0, 4, stream=stream), PROMPT)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def started(backend: SlowBackend, registry: CollectorRegistry, timeout_s: float = 5):
    runner = ModelRunner(backend, Metrics(registry), timeout_s)
    await runner.start()
    return runner


@pytest.fixture
async def scheduler() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_scores_and_reports_ready(registry, scheduler) -> None:
    runner = await started(SlowBackend(), registry)
    scheduler.append(asyncio.create_task(runner.run()))
    async with asyncio.timeout(5):
        score = await runner.score(request("a"))
    assert score.significance == 1
    assert registry.get_sample_value("streamd_model_ready") == 1
    assert registry.get_sample_value("streamd_stage_seconds_count", {"stage": "queue"}) == 1
    await runner.close()
    assert registry.get_sample_value("streamd_model_ready") == 0


async def test_a_quiet_window_is_described_only_when_no_window_waits(registry, scheduler) -> None:
    backend = SlowBackend(delay_s=0.2)  # decides on the description after the delay
    runner = await started(backend, registry)
    scheduler.append(asyncio.create_task(runner.run()))
    mailbox = threading.Event()  # a live stream's pending window, as a pipeline registers it
    runner.add_demand(mailbox.is_set)

    def quiet(stream: str) -> ScoreRequest:
        return ScoreRequest(
            window(1, 0, 4, stream=stream), PROMPT, describe_below=5, spare=runner.has_spare_time
        )

    async with asyncio.timeout(10):
        alone = await runner.score(quiet("a"))
        mailbox.set()
        behind_a_mailbox = await runner.score(quiet("a"))
        mailbox.clear()
        both = await asyncio.gather(runner.score(quiet("a")), runner.score(quiet("b")))
        loud = await runner.score(
            ScoreRequest(window(1, 0, 4, stream="c"), PROMPT, 1, lambda: False)
        )
    assert (alone.significance, alone.description) == (1, "No motion.")  # nobody waited
    assert behind_a_mailbox.description == ""
    # While a's score is read, b waits in the queue; then b's is read with nobody waiting.
    assert [score.description for score in both] == ["", "No motion."]
    assert loud.description == "No motion."  # at or above describe_below: always described
    await runner.close()


async def test_runs_on_one_dedicated_thread(registry, scheduler) -> None:
    names: set[str] = set()

    class Recording(SlowBackend):
        def score(self, requests):
            names.add(threading.current_thread().name)
            return super().score(requests)

        def load(self) -> None:
            names.add(threading.current_thread().name)

    runner = await started(Recording(), registry)
    scheduler.append(asyncio.create_task(runner.run()))
    async with asyncio.timeout(5):
        await asyncio.gather(*(runner.score(request(s)) for s in "abc"))
    assert len(names) == 1
    assert next(iter(names)).startswith("streamd-model")
    await runner.close()


async def test_batches_windows_of_different_streams_fairly(registry, scheduler) -> None:
    backend = SlowBackend(delay_s=0.05, max_batch=4)
    runner = await started(backend, registry)
    scheduler.append(asyncio.create_task(runner.run()))
    async with asyncio.timeout(5):
        first = asyncio.create_task(runner.score(request("a", 1)))
        await asyncio.sleep(0.01)  # the model is now busy with a's window
        rest = [
            asyncio.create_task(runner.score(request(stream, seq)))
            for stream, seq in (("a", 2), ("b", 1), ("c", 1), ("b", 2))
        ]
        await asyncio.gather(first, *rest)
    # One window per stream per batch, in arrival order: a2, b1, c1 together, then b2.
    assert backend.calls == [["a"], ["a", "b", "c"], ["b"]]
    await runner.close()


async def test_backend_failure_fails_only_that_batch(registry, scheduler) -> None:
    backend = SlowBackend()
    runner = await started(backend, registry)
    scheduler.append(asyncio.create_task(runner.run()))
    backend.fail_next = True
    async with asyncio.timeout(5):
        with pytest.raises(ModelError, match="injected failure"):
            await runner.score(request("a"))
        assert (await runner.score(request("a", 2))).significance == 1
    await runner.close()


async def test_stall_fails_waiters_then_recovers(registry, scheduler) -> None:
    backend = SlowBackend()
    runner = await started(backend, registry, timeout_s=0.2)
    scheduler.append(asyncio.create_task(runner.run()))
    backend.hang.set()
    async with asyncio.timeout(5):
        with pytest.raises(ModelError, match="stalled"):
            await runner.score(request("a"))
        assert runner.stalled_since is not None
        with pytest.raises(ModelError, match="stalled"):
            await runner.score(request("b"))
        backend.hang.clear()
        backend.release.set()  # the stuck call returns
        await eventually(lambda: runner.stalled_since is None, what="recovered")
        assert (await runner.score(request("a", 2))).significance == 1
    await runner.close()


async def test_keeps_max_in_flight_calls_running_at_once(registry, scheduler) -> None:
    backend = SlowBackend(max_in_flight=3)
    backend.barrier = threading.Barrier(3)  # broken (an error) unless 3 calls overlap
    runner = await started(backend, registry)
    scheduler.append(asyncio.create_task(runner.run()))
    async with asyncio.timeout(10):
        scores = await asyncio.gather(*(runner.score(request(s)) for s in ("a", "b", "c")))
    assert len(scores) == 3
    assert sorted(stream for call in backend.calls for stream in call) == ["a", "b", "c"]
    assert all(len(call) == 1 for call in backend.calls)  # max_batch 1: one window a call
    await runner.close()


async def test_a_slow_call_holds_up_no_other(registry, scheduler) -> None:
    backend = SlowBackend(max_in_flight=2)
    runner = await started(backend, registry)
    scheduler.append(asyncio.create_task(runner.run()))
    backend.hang.set()
    stuck = asyncio.create_task(runner.score(request("slow")))
    await eventually(lambda: backend.calls == [["slow"]])
    backend.hang.clear()
    async with asyncio.timeout(5):  # answered while "slow" is still in the model
        for seq in range(1, 4):
            await runner.score(request("fast", seq))
    assert not stuck.done()
    backend.release.set()
    await asyncio.wait_for(stuck, 5)
    await runner.close()


async def test_model_errors_are_counted_by_reason_and_named_in_health(registry, scheduler) -> None:
    class Unreachable(SlowBackend):
        fail = True

        def score(self, requests):
            if self.fail:
                raise ModelError("server gone", reason="unreachable", health="server gone")
            return super().score(requests)

    backend = Unreachable()
    runner = await started(backend, registry)
    scheduler.append(asyncio.create_task(runner.run()))
    with pytest.raises(ModelError, match="server gone"):
        await runner.score(request("a"))
    assert runner.problem == "server gone"
    assert registry.get_sample_value("streamd_model_errors_total", {"reason": "unreachable"}) == 1
    backend.fail = False
    await runner.score(request("a", 2))
    assert runner.problem is None
    await runner.close()


async def test_load_failure_is_a_model_error(registry) -> None:
    class Broken(SlowBackend):
        def load(self) -> None:
            raise ModelError("cannot load weights: /nope")

    runner = ModelRunner(Broken(), Metrics(registry), 5)
    with pytest.raises(ModelError, match="/nope"):
        await runner.start()
    assert registry.get_sample_value("streamd_model_ready") == 0
    await runner.close()


async def test_close_reports_a_backend_that_fails_to_close(
    registry, caplog: pytest.LogCaptureFixture
) -> None:
    class BadClose(SlowBackend):
        def close(self) -> None:
            raise RuntimeError("device lost")

    caplog.set_level(logging.WARNING, logger="streamd")
    runner = await started(BadClose(), registry)
    await runner.close()  # still closes: never raises
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "failed to close" in warnings[0].getMessage()
    assert "device lost" in warnings[0].getMessage()
    assert registry.get_sample_value("streamd_model_ready") == 0


async def test_not_ready_refuses(registry) -> None:
    runner = ModelRunner(SlowBackend(), Metrics(registry), 5)
    with pytest.raises(ModelError, match="not ready"):
        await runner.score(request("a"))
    await runner.close()


def test_backend_table() -> None:
    assert resolve_backend_name("motion") == "motion"
    assert resolve_backend_name("auto") in {"transformers", "mlx"}
    backend = create_backend(ModelConfig(backend="motion"))
    assert isinstance(backend, MotionBackend)
    assert isinstance(backend, ScoringBackend)


# --- frames encoded ahead of their windows -------------------------------------------------------


class Ahead(SlowBackend):
    """Records what is encoded ahead; windows and frames in the order the model saw them."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s=delay_s)
        self.order: list[str] = []
        self.encoded: set[tuple[str, int]] = set()

    @property
    def encodes_ahead(self) -> bool:
        return True

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        self.order += [f"frame {f.index}" for f in frames]
        new = {(f.stream, f.index) for f in frames} - self.encoded
        self.encoded |= new
        return len(new)

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        self.order += [f"window {r.window.seq}" for r in requests]
        return super().score(requests)


async def test_frames_are_encoded_ahead_only_when_no_window_waits(registry, scheduler) -> None:
    backend = Ahead()
    runner = await started(backend, registry)
    backend.hang.set()  # the first window holds the model until released
    scheduler.append(asyncio.create_task(runner.run()))
    first = asyncio.create_task(runner.score(request("a", seq=1)))
    await eventually(lambda: backend.order == ["window 1"], within_s=5)
    later = window(2, 4, 8, stream="a", n=4)  # frames 200-203
    for f in later.frames:
        runner.offer_frame(f)  # arrive while the model is busy
    second = asyncio.create_task(runner.score(ScoreRequest(later, PROMPT)))
    await asyncio.sleep(0.1)
    backend.hang.clear()
    backend.release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(first, second)
    # The waiting window went first and encoded its own frames: none were encoded ahead.
    assert backend.order == ["window 1", "window 2"]
    for f in window(3, 8, 12, stream="a", n=3).frames:  # frames 300-302, the model idle
        runner.offer_frame(f)
    await eventually(lambda: len(backend.encoded) == 3, within_s=5)
    assert backend.order[2:] == ["frame 300", "frame 301", "frame 302"]
    encoded = registry.get_sample_value("streamd_vision_ahead_frames_total", {"outcome": "encoded"})
    assert encoded == 3
    await runner.close()


async def test_frames_offered_ahead_are_bounded_and_counted(registry, scheduler) -> None:
    backend = Ahead()
    runner = await started(backend, registry)
    backend.hang.set()
    scheduler.append(asyncio.create_task(runner.run()))
    busy = asyncio.create_task(runner.score(request("a", seq=1)))
    await eventually(lambda: backend.order == ["window 1"], within_s=5)
    for index in range(AHEAD_FRAMES + 5):
        runner.offer_frame(frame(1000 + index, float(index), stream="b"))
    dropped = registry.get_sample_value("streamd_vision_ahead_frames_total", {"outcome": "dropped"})
    assert dropped == 5  # the oldest went; their windows will encode them
    backend.hang.clear()
    backend.release.set()
    await busy
    await eventually(lambda: len(backend.encoded) == AHEAD_FRAMES, within_s=10)
    assert min(index for _, index in backend.encoded) == 1005
    await runner.close()


async def test_tiny_smolvlm_window_finds_its_frames_encoded(
    registry, scheduler, tiny_model_dir
) -> None:
    from streamd.scoring.transformers_impl import TransformersBackend  # noqa: PLC0415 - torch

    backend = TransformersBackend(
        ModelConfig(backend="transformers", id=str(tiny_model_dir), dtype="float32", device="cpu")
    )
    runner = ModelRunner(backend, Metrics(registry), 30)
    await runner.start()
    scheduler.append(asyncio.create_task(runner.run()))
    frames = tuple(
        Frame("cam", i, float(i), 1000.0 + i, bars(i, backend.input_size[0])) for i in range(4)
    )
    for f in frames:
        runner.offer_frame(f)
    await eventually(
        lambda: (
            registry.get_sample_value("streamd_vision_ahead_frames_total", {"outcome": "encoded"})
            == 4
        ),
        within_s=30,
    )
    async with asyncio.timeout(60):
        score = await runner.score(ScoreRequest(Window("cam", 1, 0.0, 4.0, frames, 1000.0), PROMPT))
    assert (score.timings.vision_hits, score.timings.vision_misses) == (4, 0)
    assert score.timings.vision_s == 0.0  # nothing left to encode when the window came
    await runner.close()


async def test_warm_up_only_when_asked() -> None:
    """``analyze`` loads without a throwaway window; the live daemon warms up."""

    class Counting(SlowBackend):
        warmed = 0

        def warm_up(self) -> None:
            self.warmed += 1

    for warm, expected in ((False, 0), (True, 1)):
        backend = Counting()
        async with ModelRunner(backend, Metrics(CollectorRegistry()), 5, warm_up=warm):
            pass
        assert backend.warmed == expected
