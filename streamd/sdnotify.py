"""systemd's notify protocol (READY=1, WATCHDOG=1, STOPPING=1) over $NOTIFY_SOCKET, stdlib only."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state lines to systemd when started by it with ``Type=notify``; else does nothing.

    The environment is read once, at construction (startup).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path:
            # A leading "@" names a socket in the abstract namespace.
            self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the period, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval_s = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to talk to."""
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send one state line; False if there is no socket or sending failed (never raises)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                sock.sendto(state.encode(), self.address)
        except OSError as exc:
            logger.debug("sd_notify %r failed: %s", state, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd the daemon is up."""
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        """Keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd a clean stop has begun."""
        return self.notify("STOPPING=1")
