"""Capped full-jitter backoff for reconnect loops (sources and the MQTT broker)."""

from __future__ import annotations

import random

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
_MAX_EXPONENT = 16


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt``: uniform in ``[0, min(cap, base * 2**n))``.

    Full jitter spreads many clients' retries out, so a broker or a camera that comes back
    is not hit by all of them at once (AWS Architecture Blog, "Exponential Backoff And Jitter").
    """
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(0, ceiling)
