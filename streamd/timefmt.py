"""Clock strings for people: ``M:SS`` and ``H:MM:SS`` (pure, stdlib only)."""

from __future__ import annotations

HOUR_S = 3600
MINUTE_S = 60


def format_clock(seconds: float, with_hours: bool | None = None) -> str:
    """Whole seconds as ``M:SS``, or ``H:MM:SS``; negative times show as ``0:00``.

    Args:
        seconds: The time to show.
        with_hours: True always shows hours, False never does (minutes then go past 59),
            None shows them from an hour on.
    """
    total = max(0, int(seconds))
    if with_hours is None:
        with_hours = total >= HOUR_S
    if not with_hours:
        minutes, secs = divmod(total, MINUTE_S)
        return f"{minutes}:{secs:02d}"
    hours, rest = divmod(total, HOUR_S)
    minutes, secs = divmod(rest, MINUTE_S)
    return f"{hours}:{minutes:02d}:{secs:02d}"
