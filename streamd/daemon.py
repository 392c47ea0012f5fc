"""Daemon: startup, main loop, shutdown; signals, health, systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from streamd.config import Config
from streamd.domain import Event, Frame
from streamd.errors import ExitCode, StreamdError
from streamd.ingest import FRAME_TIMEOUT_FACTOR, PyAVSource
from streamd.metrics import Metrics
from streamd.pipeline import Keeping, StreamPipeline, clip_name, snapshot_jpeg
from streamd.scoring import create_backend
from streamd.scoring.base import ScoringBackend
from streamd.scoring.runner import ModelRunner
from streamd.sdnotify import SystemdNotifier
from streamd.sinks import EventSink, LogSink
from streamd.sinks.stored import SettleHook, StoredSink
from streamd.store.events import EventStore
from streamd.store.schema import CLIPS_DIR
from streamd.web.api import create_app
from streamd.web.server import HttpServer

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from streamd.store.clips import ClipRecorder

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TICK_S = 1.0
CLOSE_S = 0.5
"""Kept back from the shutdown budget to say goodbye to the broker."""
PIPELINE_SHARE = 0.5
"""Share of ``shutdown_timeout_s`` the pipelines get to finish the window in the model."""
JOIN_MIN_S = 0.1
"""Decode threads always get this long to end, even when the shutdown budget is spent."""


class Daemon:
    """Runs every stream of a ``Config`` until a signal, or until every file stream has ended.

    ``serve()`` = capture signals, ``startup`` (metrics, model, sink), the main loop (a 1 s tick
    for health, the systemd watchdog and exit conditions), and a shutdown bounded by
    ``shutdown_timeout_s``. Resources are entered on an ``AsyncExitStack``, so teardown is
    startup reversed. Exit codes: 0 clean, 1 runtime failure, 3 startup failure.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        backend: ScoringBackend | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self._backend = backend
        self.notifier = notifier or SystemdNotifier()
        self.should_exit = False
        self.force_exit = False
        self._wake = asyncio.Event()
        self.pipelines: list[StreamPipeline] = []
        self.runner: ModelRunner | None = None
        self.store: EventStore | None = None
        self.http: HttpServer | None = None
        self._started = False
        self._last_watchdog = 0.0
        self._threads_left: list[str] = []

    @property
    def needs_hard_exit(self) -> bool:
        """A thread may still be busy (forced exit, stuck model): don't wait for it at exit."""
        stalled = self.runner is not None and self.runner.stalled_since is not None
        left = bool(self._threads_left)
        return self.force_exit or stalled or left or (self.should_exit and not self._started)

    # --- signals -------------------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: graceful stop. Second: stop now."""
        if self.should_exit and sig in HANDLED_SIGNALS:
            self.force_exit = True
            logger.warning("second signal: exiting now")
        else:
            logger.info("received %s: stopping", signal.Signals(sig).name)
        self.should_exit = True
        self._wake.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to ``handle_exit`` while serving; restore the old handlers."""
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in HANDLED_SIGNALS:
                loop.remove_signal_handler(sig)

    # --- serve ---------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until stopped; returns the exit code."""
        with self.capture_signals():
            return await self._serve()

    async def _serve(self) -> int:
        config = self.config
        async with AsyncExitStack() as stack:
            try:
                address = config.http.address
                if address is not None:  # first: a taken port fails before the model loads
                    server = HttpServer(address, self._app())
                    server.bind()
                    await server.start()
                    stack.push_async_callback(server.stop)
                    self.http = server
                store = EventStore(
                    config.storage.dir,
                    self.metrics,
                    retain_s=config.storage.retain_days * 86400,
                    max_bytes=config.storage.max_bytes,
                )
                await store.open()
                stack.push_async_callback(store.close)
                self.store = store
                backend = self._backend or create_backend(config.model)
                runner = ModelRunner(backend, self.metrics, config.model.stall_timeout_s)
                self.runner = runner
                stack.push_async_callback(runner.close)
                if not await self._interruptible(runner.start()):
                    return ExitCode.OK  # a signal during startup
                self._started = True
            except StreamdError as exc:
                logger.error("startup failed: %s", exc)
                return ExitCode.STARTUP
            sink = StoredSink(store, lambda settle: self._make_sink(backend.model_id, settle))
            seqs = await sink.start()
            self.pipelines = [
                StreamPipeline(
                    stream,
                    runner,
                    sink,
                    self.metrics,
                    keeping=Keeping(store, self._recorder(stream.name), seqs.get(stream.name, 0)),
                )
                for stream in config.streams
            ]
            code: int = ExitCode.FAILURE
            try:
                code = await self._run(runner, sink)
            except* StreamdError as group:
                if not self.force_exit:
                    logger.error("stopped on failure: %s", group.exceptions[0])
                else:  # work cut short by a second signal fails as it goes: not a failure
                    logger.warning("forced stop: %s", group.exceptions[0])
                    code = ExitCode.OK
            # A forced stop (second signal) is a stop asked for: 0, like a graceful one.
            return ExitCode.OK if self.force_exit else code

    def _app(self) -> ASGIApp:
        return create_app(self, self.registry, self.config.http.token(), latest_jpeg)

    @property
    def views(self) -> list[StreamPipeline]:
        """The streams, for the API (empty until the model is ready)."""
        return self.pipelines

    def _recorder(self, stream: str) -> ClipRecorder | None:
        """The stream's clip recorder, when events are kept on disk."""
        store = self.store
        root = self.config.storage.dir
        if store is None or root is None or not store.durable:
            return None
        from streamd.store.clips import ClipRecorder  # noqa: PLC0415 - PyAV muxing only when used

        def done(event_id: str, _path: Path, size: int, _complete: bool) -> None:
            with contextlib.suppress(RuntimeError):  # the store is closed: shutting down
                store.submit(store.set_clip, event_id, clip_name(event_id), size)

        storage = self.config.storage
        return ClipRecorder(
            stream,
            root / CLIPS_DIR,
            storage.pre_roll_s,
            storage.post_roll_s,
            self.metrics,
            on_done=done,
        )

    async def _run(self, runner: ModelRunner, sink: EventSink) -> int:
        async with asyncio.TaskGroup() as tasks:
            runner_task = tasks.create_task(runner.run(), name="streamd.model")
            sink_task = tasks.create_task(sink.run(), name="streamd.sink")
            pipeline_tasks = [
                tasks.create_task(p.run(), name=f"streamd[{p.name}]") for p in self.pipelines
            ]
            self.notifier.ready(f"{len(self.pipelines)} streams")
            logger.info("streamd running: %d streams", len(self.pipelines))
            code = await self.main_loop(pipeline_tasks)
            self.notifier.stopping()
            await self.shutdown(pipeline_tasks, sink)
            runner_task.cancel("shutdown")
            sink_task.cancel("shutdown")
        return code

    def _make_sink(self, model_id: str, settle: SettleHook) -> EventSink:
        if not self.config.mqtt.enabled:
            return LogSink(on_published=self._count_published, on_settled=settle)
        from streamd.sinks.mqtt import MqttPublisher  # noqa: PLC0415 - aiomqtt only when used

        names = [stream.name for stream in self.config.streams]
        return MqttPublisher(
            self.config.mqtt, self.metrics, names, model_id=model_id, on_settled=settle
        )

    def _count_published(self, event: Event) -> None:
        self.metrics.events_published.labels(stream=event.stream, type=event.type.value).inc()

    async def _interruptible(self, work: Awaitable[object]) -> bool:
        """Await ``work`` until done (True), or until a signal interrupts it (False).

        During startup any signal interrupts; during shutdown (``should_exit`` already set) only
        a second one does. Interrupted work is cancelled; its exception, if any, propagates.
        Callers bound the wait with ``asyncio.timeout``.
        """
        task = asyncio.ensure_future(work)
        interrupt = asyncio.ensure_future(self._until_interrupted(self.should_exit))
        try:
            await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            task.result()
            return True
        return False

    async def _until_interrupted(self, stopping: bool) -> None:
        while not (self.force_exit if stopping else self.should_exit):
            self._wake.clear()
            await self._wake.wait()

    # --- main loop -----------------------------------------------------------------------------

    async def main_loop(self, pipeline_tasks: list[asyncio.Task[None]]) -> int:
        """Tick until told to exit or every stream has ended; returns the exit code."""
        while not self.should_exit:
            self._ping_watchdog()
            if all(task.done() for task in pipeline_tasks):
                failed = [p.name for p in self.pipelines if p.last_error is not None]
                if failed:
                    logger.error("every stream ended; failed: %s", ", ".join(failed))
                    return ExitCode.FAILURE
                logger.info("every stream ended")
                return ExitCode.OK
            if self._stalled_too_long():
                return ExitCode.FAILURE
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
        return ExitCode.OK

    def health(self) -> tuple[bool, str]:  # noqa: PLR0911 - one answer per check, in order
        """``/healthz``: evaluated when asked (the HTTP server runs on the daemon's loop).

        It only reads attributes that are replaced whole (a flag, a float, the pipeline list,
        each pipeline's status pair), never state that is changed in place.
        """
        if self.should_exit:
            return False, "stopping"
        runner = self.runner
        if runner is None or not runner.ready:
            return False, "model not ready"
        if runner.stalled_since is not None:
            return False, "model stalled"
        if runner.problem is not None:
            return False, runner.problem
        if not self.pipelines:
            return False, "starting"
        down = [p.name for p in tuple(self.pipelines) if not p.healthy]
        if down:
            return False, "streams down: " + ", ".join(down)
        return True, "ok"

    def _ping_watchdog(self) -> None:
        # The watchdog watches streamd itself (a hung loop, a stuck model), not the cameras:
        # restarting does not bring a dead camera back.
        interval = self.notifier.watchdog_interval_s
        if interval is None or (self.runner is not None and self.runner.stalled_since is not None):
            return
        now = time.monotonic()
        if now - self._last_watchdog >= min(interval, TICK_S):
            self._last_watchdog = now
            self.notifier.watchdog()

    def _stalled_too_long(self) -> bool:
        runner = self.runner
        if runner is None or runner.stalled_since is None or runner.timeout_s is None:
            return False
        stalled = time.monotonic() - runner.stalled_since
        if stalled < runner.timeout_s:
            return False
        logger.error("model stalled for %.0fs: exiting so the service manager restarts", stalled)
        return True

    # --- shutdown ------------------------------------------------------------------------------

    async def shutdown(self, pipeline_tasks: list[asyncio.Task[None]], sink: EventSink) -> None:
        """Stop ingest, end events, flush the sink, all within ``shutdown_timeout_s``."""
        budget = self.config.shutdown_timeout_s
        deadline = time.monotonic() + budget
        for pipeline in self.pipelines:
            pipeline.stop()
        pending = {task for task in pipeline_tasks if not task.done()}
        if pending and not self.force_exit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(budget * PIPELINE_SHARE):
                    await self._interruptible(asyncio.wait(pending))
        pending = {task for task in pending if not task.done()}
        for task in pending:
            task.cancel("shutdown")  # ends open events in the pipeline's finally
        if pending:
            await asyncio.wait(pending, timeout=1.0)
            logger.warning("shutdown: cancelled %d pipeline task(s) still analysing", len(pending))
        if not self.force_exit:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic() - CLOSE_S)):
                    await self._interruptible(sink.flush())
            except TimeoutError:
                logger.warning("shutdown: events still undelivered after %.0fs", budget)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(CLOSE_S, deadline - time.monotonic())):
                await sink.close()
        await self._join_sources(deadline)
        logger.info("streamd stopped")

    async def _join_sources(self, deadline: float) -> None:
        """Wait for the decode threads, off the loop, as long as a blocked read may take.

        A read or an open gives up after its timeout (PyAV's interrupt fires at about twice the
        read timeout), bounded by what is left of the shutdown budget. A thread still running
        then is named in the log and left behind (``needs_hard_exit``).
        """
        sources = [p.source for p in self.pipelines if p.source is not None]
        if not sources:
            return
        left = max(JOIN_MIN_S, deadline - time.monotonic())
        if self.force_exit:
            left = JOIN_MIN_S
        joined = await asyncio.gather(
            *(
                asyncio.to_thread(source.join, min(left, join_timeout_s(source)))
                for source in sources
            )
        )
        self._threads_left = [s.name for s, done in zip(sources, joined, strict=True) if not done]
        if self._threads_left:
            logger.warning(
                "shutdown: decode thread of %s still running (blocked reading); leaving it",
                ", ".join(self._threads_left),
            )


def latest_jpeg(frame: Frame) -> bytes:
    """``latest.jpg``: the frame at the source's resolution when kept, else un-squashed."""
    return frame.source_jpeg if frame.source_jpeg is not None else snapshot_jpeg(frame)


def join_timeout_s(source: PyAVSource) -> float:
    """How long a decode thread may take to notice ``stop``: its longest blocking call."""
    cfg = source.config
    return max(cfg.open_timeout_s, FRAME_TIMEOUT_FACTOR * cfg.read_timeout_s) + CLOSE_S


def run(config: Config, backend: ScoringBackend | None = None) -> int:
    """Serve ``config`` on a fresh event loop; returns the exit code (the ``run`` command).

    If a thread may still be busy (a forced exit, a stuck model), the process exits at once
    instead of letting the interpreter wait for that thread at exit.
    """
    daemon = Daemon(config, backend=backend)
    try:
        code = asyncio.run(daemon.serve())
    except Exception:
        logger.exception("streamd crashed")
        code = ExitCode.FAILURE
    if daemon.needs_hard_exit:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code
