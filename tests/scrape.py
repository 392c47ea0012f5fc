"""Real HTTP reads of /metrics and /healthz, and picking values out of the exposition text."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def get(url: str) -> tuple[int, str]:
    """``(status, body)``; ``(0, "")`` while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


async def answers(url: str, expected: tuple[int, str]) -> bool:
    """Whether ``url`` answers ``(status, body)`` now; read off the event loop.

    The daemon's HTTP server runs on the test's loop: a blocking read there would wait for an
    answer the blocked loop can never give.
    """
    return await asyncio.to_thread(get, url) == expected


async def aget(url: str) -> tuple[int, str]:
    """``get`` off the event loop."""
    return await asyncio.to_thread(get, url)


def metric(body: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``.

    Fails if no sample has that name at all, so a misspelt name cannot pass an upper-bound
    assertion by reading as 0.
    """
    total, named = 0.0, False
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name != name:
                continue
            named = True
            if labels.items() <= sample.labels.items():
                total += sample.value
    if not named:
        raise AssertionError(f"no {name} in the metrics")
    return total
