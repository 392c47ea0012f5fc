"""StreamPipeline in-process: real decode, windows, runner and sink; metrics as the oracle."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamd.config import StreamConfig
from streamd.metrics import Metrics
from streamd.pipeline import StreamPipeline
from streamd.scoring.runner import ModelRunner
from streamd.sinks import LogSink
from tests.media import ClipSet, Segment, write_clip
from tests.pipelines import run_pipeline
from tests.slow_backend import SlowBackend


async def run_file(url: str, backend: SlowBackend, **stream: object) -> CollectorRegistry:
    settings = {
        "window_s": 2,
        "stride_s": 1,
        "min_significance": 5,
        "cooldown_s": 0,
        "motion_gate": 0,  # unless a test sets one
        **stream,
    }
    return await run_pipeline(
        StreamConfig.model_validate({"name": "cam", "url": url, **settings}), backend
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"stream": "cam", **labels}) or 0.0


async def test_motion_gate_skips_static_windows(clips: ClipSet) -> None:
    backend = SlowBackend()
    registry = await run_file(str(clips.static.path), backend, motion_gate=0.01)
    cut = value(registry, "streamd_windows_total")
    assert cut == 5  # 6 s at 1 fps, 2 s windows every 1 s
    assert value(registry, "streamd_windows_dropped_total", reason="motion_gate") == cut
    assert value(registry, "streamd_windows_analyzed_total") == 0
    assert backend.calls == []  # the model never ran


async def test_motion_gate_lets_motion_through(clips: ClipSet) -> None:
    backend = SlowBackend()
    registry = await run_file(str(clips.motion.path), backend, motion_gate=0.01)
    assert value(registry, "streamd_windows_dropped_total", reason="motion_gate") == 0
    assert value(registry, "streamd_windows_analyzed_total") == value(
        registry, "streamd_windows_total"
    )


async def test_file_waits_for_a_slow_model_and_drops_nothing(
    clips: ClipSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.pipeline")
    backend = SlowBackend(delay_s=0.05)
    registry = await run_file(str(clips.activity.path), backend)
    cut = value(registry, "streamd_windows_total")
    assert cut == 15
    assert value(registry, "streamd_windows_analyzed_total") == cut
    assert value(registry, "streamd_windows_dropped_total", reason="busy") == 0
    events = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event ")]
    assert events[0].startswith("event new cam")
    assert events[-1].startswith("event end cam")


@pytest.fixture
def hung_http() -> Iterator[str]:
    """An HTTP "server" that accepts connections and never answers: av.open blocks in it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/stream.mp4"


def test_a_state_change_after_the_loop_closed_is_dropped_quietly(
    hung_http: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decode thread outlives the loop (blocked in av.open), then reports STOPPED.
    failures: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    config = StreamConfig.model_validate({"name": "cam", "url": hung_http, "open_timeout_s": 1})
    pipelines: list[StreamPipeline] = []

    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        async with ModelRunner(SlowBackend(), metrics, timeout_s=10) as runner:
            pipeline = StreamPipeline(config, runner, LogSink(), metrics)
            pipelines.append(pipeline)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await pipeline.run()

    asyncio.run(main())  # returns with the loop closed, the thread still in av.open
    source = pipelines[0].source
    assert source is not None
    assert source.join(10)
    assert failures == []  # no RuntimeError('Event loop is closed') in the decode thread


async def test_recorded_mp4_over_http_is_analysed_once_at_1x(
    tmp_path: Path, http_server: Callable[[Path], str]
) -> None:
    # live: auto on http: live rings, but the source finds a duration and ends at its end.
    write_clip(tmp_path / "clip.mp4", [Segment(3, "bars")])
    started = time.monotonic()
    registry = await run_file(f"{http_server(tmp_path)}/clip.mp4", SlowBackend())
    assert time.monotonic() - started >= 2 * 0.9  # at 1x: the last sample (2 s) shows at 2 s
    assert value(registry, "streamd_reconnects_total") == 0
    cut = value(registry, "streamd_windows_total")
    assert cut >= 2
    assert value(registry, "streamd_windows_analyzed_total") == cut
