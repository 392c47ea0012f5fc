"""Run the real daemon as a subprocess and watch its log lines and systemd notifications."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.waiting import eventually_sync

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


class DaemonProcess:
    """``streamd run`` (or ``tests.run_daemon``) in a subprocess, with its stderr collected."""

    def __init__(
        self,
        config: Path,
        *,
        delay_s: float | None = None,
        env: dict[str, str] | None = None,
        notify: bool = False,
        watchdog_usec: int | None = None,
    ) -> None:
        if delay_s is None:
            argv = [sys.executable, "-m", "streamd", "run", "-c", str(config)]
        else:
            argv = [sys.executable, "-m", "tests.run_daemon", str(config), "--delay", str(delay_s)]
        environ = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.notifications: list[str] = []
        self.notified_at: list[float] = []  # time.monotonic() each notification arrived
        self._sock: socket.socket | None = None
        if notify:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = config.with_suffix(".notify")
            self._sock.bind(str(path))
            self._sock.settimeout(0.2)
            environ["NOTIFY_SOCKET"] = str(path)
            if watchdog_usec:
                environ["WATCHDOG_USEC"] = str(watchdog_usec)
        self.lines: list[str] = []
        self.line_at: list[float] = []  # time.monotonic() each line arrived
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._readers = [threading.Thread(target=self._read, daemon=True)]
        if self._sock is not None:
            self._readers.append(threading.Thread(target=self._listen, daemon=True))
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.line_at.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))

    def _listen(self) -> None:
        assert self._sock is not None
        while self.proc.poll() is None or self._sock is not None:
            try:
                data = self._sock.recv(4096)
            except (TimeoutError, OSError):
                if self.proc.poll() is not None:
                    return
                continue
            self.notified_at.append(time.monotonic())
            self.notifications.append(data.decode())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, within_s: float = 20.0) -> str:
        regex = re.compile(pattern)

        def found() -> bool:
            return any(regex.search(line) for line in self.lines)

        eventually_sync(lambda: found() or self.proc.poll() is not None, within_s, pattern)
        for line in self.lines:
            if regex.search(line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-3000:]}")

    def line_time(self, pattern: str) -> float:
        """When the first line matching ``pattern`` arrived (time.monotonic())."""
        regex = re.compile(pattern)
        for at, line in zip(self.line_at, self.lines, strict=False):
            if regex.search(line):
                return at
        raise AssertionError(f"no line matching {pattern!r}")

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, within_s: float = 30.0) -> int:
        code = self.proc.wait(within_s)
        for reader in self._readers:
            reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
