"""The daemon in-process (real decode, runner, metrics server): shutdown, health, fairness."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streamd.config import Config
from streamd.daemon import Daemon
from streamd.domain import Frame, Score, ScoreRequest
from streamd.errors import ExitCode, ModelError
from streamd.sdnotify import SystemdNotifier
from tests.broker import free_port
from tests.media import ClipSet
from tests.scrape import answers, get
from tests.slow_backend import SlowBackend
from tests.waiting import eventually

SERVE_TIMEOUT_S = 30.0


def make_config(streams: list[dict[str, Any]], **top: Any) -> Config:
    return Config.model_validate(
        {
            "model": {"backend": "motion"},
            "mqtt": {"enabled": False},
            "metrics": {"listen": ""},
            "shutdown_timeout_s": 10,
            "defaults": {
                "window_s": 2,
                "stride_s": 1,
                "min_significance": 5,
                "cooldown_s": 0,
                "motion_gate": 0,  # every window analysed: the gate has tests of its own
            },
            "streams": streams,
            **top,
        }
    )


def make_daemon(config: Config, backend: SlowBackend) -> Daemon:
    return Daemon(
        config, registry=CollectorRegistry(), backend=backend, notifier=SystemdNotifier({})
    )


@pytest.fixture
def hung_http() -> Iterator[str]:
    """An HTTP "server" that accepts connections and never answers: av.open blocks in it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/stream.mp4"


class LoopWatch:
    """Measures the longest the event loop went without running a 20 ms ticker."""

    def __init__(self) -> None:
        self.longest_gap_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def stop_when(daemon: Daemon, condition: Any, within_s: float = 10) -> None:
    await eventually(condition, within_s)
    daemon.handle_exit(signal.SIGTERM, None)


async def test_shutdown_waits_off_the_loop_for_a_blocked_decode_thread(
    hung_http: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The decode thread sits in av.open for open_timeout_s; the old shutdown joined for 0.1 s.
    caplog.set_level(logging.INFO, logger="streamd")
    config = make_config([{"name": "cam", "url": hung_http, "open_timeout_s": 2}])
    daemon = make_daemon(config, SlowBackend())
    with LoopWatch() as watch:
        stopper = asyncio.create_task(
            stop_when(daemon, lambda: daemon.pipelines and daemon.pipelines[0].source)
        )
        async with asyncio.timeout(SERVE_TIMEOUT_S):
            code = await daemon.serve()
        await stopper
    assert code == ExitCode.OK
    source = daemon.pipelines[0].source
    assert source is not None
    assert source.join(0), "the decode thread was left running"
    assert not daemon.needs_hard_exit
    assert watch.longest_gap_s < 0.5, watch.longest_gap_s  # the join did not block the loop
    assert "still running" not in caplog.text


async def test_a_thread_blocked_past_the_budget_is_logged_and_left(
    hung_http: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd")
    config = make_config(
        [{"name": "cam", "url": hung_http, "open_timeout_s": 8}], shutdown_timeout_s=1
    )
    daemon = make_daemon(config, SlowBackend())
    stopper = asyncio.create_task(
        stop_when(daemon, lambda: daemon.pipelines and daemon.pipelines[0].source)
    )
    started = time.monotonic()
    async with asyncio.timeout(SERVE_TIMEOUT_S):
        code = await daemon.serve()
    await stopper
    assert time.monotonic() - started < 5  # bounded by the budget, not the open timeout
    assert code == ExitCode.OK
    warnings = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert warnings == [
        "shutdown: decode thread of cam still running (blocked reading); leaving it"
    ]
    assert daemon.needs_hard_exit  # the process must not wait for that thread at exit
    source = daemon.pipelines[0].source
    assert source is not None
    assert await asyncio.to_thread(source.join, 15)  # it ends once its open times out


async def test_healthz_follows_a_stall_at_once(clips: ClipSet) -> None:
    port = free_port()
    stream = {"name": "cam", "url": str(clips.motion.path), "live": True}
    config = make_config(
        [stream],
        metrics={"listen": f"127.0.0.1:{port}"},
        model={"backend": "motion", "timeout_s": 1},
    )
    backend = SlowBackend()
    backend.hang.set()  # the first window blocks the model
    daemon = make_daemon(config, backend)
    serving = asyncio.create_task(daemon.serve())
    healthz = f"http://127.0.0.1:{port}/healthz"
    try:
        async with asyncio.timeout(SERVE_TIMEOUT_S):
            await eventually(lambda: daemon.runner is not None and daemon.runner.ready)
            await eventually(lambda: answers(healthz, (200, "ok\n")), what="healthy")
            runner = daemon.runner
            assert runner is not None
            await eventually(lambda: runner.stalled_since is not None, 10, "stalled")
            # At once, not at the next 1 s tick of the main loop.
            assert await asyncio.to_thread(get, healthz) == (503, "model stalled\n")
            daemon.handle_exit(signal.SIGTERM, None)
            # Asked before the loop runs again: the server may be gone by then (shutdown).
            assert daemon.health() == (False, "stopping")
            backend.release.set()
            assert await serving == ExitCode.OK  # stopped before the stall outlasted timeout_s
    finally:
        backend.release.set()
        if not serving.done():
            daemon.handle_exit(signal.SIGTERM, None)
            await asyncio.wait({serving}, timeout=10)


async def test_healthz_names_an_unreachable_model_server_and_recovers(clips: ClipSet) -> None:
    port = free_port()
    stream = {"name": "cam", "url": str(clips.motion.path), "live": True}
    config = make_config([stream], metrics={"listen": f"127.0.0.1:{port}"})

    class Remote(SlowBackend):
        down = False

        def score(self, requests):
            if self.down:
                raise ModelError(
                    "model server unreachable: http://gpu/v1",
                    reason="unreachable",
                    health="model server unreachable",
                )
            return super().score(requests)

    backend = Remote()
    daemon = make_daemon(config, backend)
    serving = asyncio.create_task(daemon.serve())
    healthz = f"http://127.0.0.1:{port}/healthz"
    try:
        async with asyncio.timeout(SERVE_TIMEOUT_S):
            await eventually(lambda: answers(healthz, (200, "ok\n")), 10, "healthy")
            backend.down = True
            await eventually(
                lambda: answers(healthz, (503, "model server unreachable\n")), 10, "unreachable"
            )
            assert not serving.done()  # the daemon stays up
            backend.down = False
            await eventually(lambda: answers(healthz, (200, "ok\n")), 10, "recovered")
            dropped = daemon.registry.get_sample_value(
                "streamd_windows_dropped_total", {"stream": "cam", "reason": "model_error"}
            )
            assert dropped is not None
            assert dropped >= 1
            daemon.handle_exit(signal.SIGTERM, None)
            assert await serving == ExitCode.OK
    finally:
        if not serving.done():
            daemon.handle_exit(signal.SIGTERM, None)
            await asyncio.wait({serving}, timeout=10)


async def test_several_streams_share_one_slow_model_fairly(clips: ClipSet) -> None:
    # Three live streams cut a window a second each; the model answers about two a second.
    names = ("a", "b", "c")
    streams = [{"name": n, "url": str(clips.motion.path), "live": True} for n in names]
    backend = SlowBackend(delay_s=0.5)
    daemon = make_daemon(make_config(streams), backend)
    registry = daemon.registry

    def analysed(name: str) -> float:
        value = registry.get_sample_value("streamd_windows_analyzed_total", {"stream": name})
        return value or 0.0

    stopper = asyncio.create_task(
        stop_when(daemon, lambda: sum(map(analysed, names)) >= 15, within_s=25)
    )
    async with asyncio.timeout(SERVE_TIMEOUT_S + 10):
        assert await daemon.serve() == ExitCode.OK
    await stopper
    counts = [analysed(n) for n in names]
    assert min(counts) >= 3, counts  # nobody starves
    assert max(counts) <= 2 * min(counts), counts  # within a small factor of each other
    busy = sum(
        registry.get_sample_value("streamd_windows_dropped_total", {"stream": n, "reason": "busy"})
        or 0.0
        for n in names
    )
    assert busy > 0  # the model really was the bottleneck
    # Served in turn: no stream waits more than one round between two of its calls.
    served = [call[0] for call in backend.calls]
    for name in names:
        turns = [i for i, stream in enumerate(served) if stream == name]
        gaps = [b - a for a, b in itertools.pairwise(turns)]
        assert max(gaps) <= len(names) + 1, (name, served)


class Recording(SlowBackend):
    """Keeps every score it gave."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s=delay_s)
        self.scores: list[Score] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        scores = super().score(requests)
        self.scores.extend(scores)
        return scores


@pytest.mark.parametrize(
    ("names", "delay_s", "described"),
    [
        (("a",), 0.2, True),  # a window a second, answered in 0.2 s: time to spare
        (("a", "b", "c"), 0.5, False),  # 1.5 s of model a round: another window always waits
    ],
)
async def test_quiet_live_windows_are_described_when_the_model_has_time(
    clips: ClipSet, names: tuple[str, ...], delay_s: float, described: bool
) -> None:
    streams = [{"name": n, "url": str(clips.static.path), "live": True} for n in names]
    backend = Recording(delay_s)
    daemon = make_daemon(make_config(streams), backend)  # describe_below_min: auto
    stopper = asyncio.create_task(stop_when(daemon, lambda: len(backend.scores) >= 9, 25))
    async with asyncio.timeout(SERVE_TIMEOUT_S + 10):
        assert await daemon.serve() == ExitCode.OK
    await stopper
    quiet = [s for s in backend.scores if s.significance is not None and s.significance < 5]
    assert len(quiet) >= 9
    with_text = sum(1 for s in quiet if s.description)
    if described:
        assert with_text >= len(quiet) - 1, with_text
    else:
        assert with_text <= 2, with_text  # at most while the streams start up


class EncodesAhead(SlowBackend):
    """Notes the frames the runner hands it to encode ahead of their windows."""

    def __init__(self) -> None:
        super().__init__()
        self.ahead: list[tuple[str, int]] = []

    @property
    def encodes_ahead(self) -> bool:
        return True

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        self.ahead.extend((frame.stream, frame.index) for frame in frames)
        return len(frames)


async def test_behind_a_motion_gate_only_frames_near_motion_are_encoded_ahead(
    clips: ClipSet,
) -> None:
    streams = [
        {"name": "still", "url": str(clips.static.path), "live": True, "motion_gate": 0.01},
        {"name": "moving", "url": str(clips.motion.path), "live": True, "motion_gate": 0.01},
        {"name": "ungated", "url": str(clips.static.path), "live": True},  # motion_gate 0
    ]
    backend = EncodesAhead()
    daemon = make_daemon(make_config(streams), backend)

    def offered(stream: str) -> int:
        return sum(1 for name, _ in backend.ahead if name == stream)

    def gated() -> float:
        labels = {"stream": "still", "reason": "motion_gate"}
        return daemon.registry.get_sample_value("streamd_windows_dropped_total", labels) or 0.0

    done = lambda: offered("moving") >= 4 and offered("ungated") >= 4 and gated() >= 3  # noqa: E731
    stopper = asyncio.create_task(stop_when(daemon, done, 20))
    async with asyncio.timeout(SERVE_TIMEOUT_S + 10):
        assert await daemon.serve() == ExitCode.OK
    await stopper
    # The idle model had time for all of them: the still stream's frames were never offered.
    assert offered("still") == 0
    assert offered("moving") >= 4


async def test_an_unusable_storage_dir_is_a_startup_failure(
    clips: ClipSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a regular file where storage.dir should go")
    stream = {"name": "cam", "url": str(clips.motion.path)}
    config = make_config([stream], storage={"dir": str(not_a_dir / "streamd")})
    with caplog.at_level(logging.ERROR):
        code = await make_daemon(config, SlowBackend()).serve()
    assert code == ExitCode.STARTUP
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"startup failed: storage.dir {not_a_dir / 'streamd'}: cannot use it: Not a directory"
    ]
