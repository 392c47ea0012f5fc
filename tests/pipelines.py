"""One stream's pipeline over a file, with a real runner and the log sink (tests only)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from streamd.config import StreamConfig
from streamd.metrics import Metrics
from streamd.pipeline import StreamPipeline
from streamd.scoring.base import ScoringBackend
from streamd.scoring.runner import ModelRunner
from streamd.sinks import LogSink


async def run_pipeline(config: StreamConfig, backend: ScoringBackend) -> CollectorRegistry:
    """Run ``config``'s stream to its end through ``backend``; the metrics it left."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    async with ModelRunner(backend, metrics, timeout_s=10) as runner:
        scheduler = asyncio.create_task(runner.run())
        try:
            async with asyncio.timeout(30):
                await StreamPipeline(config, runner, LogSink(), metrics).run()
        finally:
            scheduler.cancel()
    return registry
