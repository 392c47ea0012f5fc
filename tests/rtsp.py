"""Runs tests/rtsp_server.py (GStreamer, Debian's python3) as a camera that tests can break."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.broker import stop_process

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
START_TIMEOUT_S = 10.0
_POLL_S = 0.01
_ELEMENTS = ("videotestsrc", "x264enc", "rtph264pay", "qtdemux", "h264parse", "filesrc")
_PROBE = f"""
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in {_ELEMENTS!r} if Gst.ElementFactory.find(e) is None]
print(" ".join(missing))
"""


@functools.cache
def rtsp_unavailable_reason() -> str | None:
    """None when the GStreamer RTSP server can run here, else why not."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found"
    try:
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return "probing GStreamer timed out"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"{SYSTEM_PYTHON} cannot import gi GstRtspServer ({last}); apt-get install "
            "gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-{base,good,bad,ugly}"
        )
    if probe.stdout.strip():
        return f"GStreamer elements missing: {probe.stdout.strip()}"
    return None


class RtspServer:
    """An RTSP camera at rtsp://127.0.0.1:PORT/live serving a file or a live test pattern.

    `kill()` is a dead camera, `pause()` a hung one (SIGSTOP: the TCP connection stays open
    and silent), `restart()` brings it back on the same port.
    """

    def __init__(
        self,
        *,
        file: Path | str | None = None,
        live: bool = False,
        pattern: str = "ball",
        port: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if (file is None) == (not live):
            raise ValueError("give exactly one of file=... or live=True")
        self.file = Path(file).resolve() if file is not None else None
        if self.file is not None and not self.file.is_file():
            # The server only opens the file when a client connects: fail here instead.
            raise FileNotFoundError(self.file)
        self.pattern = pattern
        self.port = port  # 0 until the first start; then fixed for restarts
        self._extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix="streamd-rtsp-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has not started yet")
        return f"rtsp://127.0.0.1:{self.port}/live"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _argv(self) -> list[str]:
        argv = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port)]
        if self.file is not None:
            argv += ["--file", str(self.file)]
        else:
            argv += ["--live", "--pattern", self.pattern]
        return argv + list(self._extra_args)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.running:
            raise RuntimeError("the RTSP server is already running")
        self._close_logs()
        out_path = Path(self._dir.name) / "stdout"
        out_path.write_bytes(b"")
        self._stdout = out_path.open("ab")
        self._stderr = (Path(self._dir.name) / "stderr").open("ab")
        self._proc = subprocess.Popen(
            self._argv(), stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr
        )
        self._paused = False
        try:
            self._wait_ready(out_path, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise RuntimeError(f"RTSP server did not start: {exc}\n{self.log_text()}") from exc

    def _wait_ready(self, out_path: Path, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            for line in out_path.read_text().splitlines():
                if line.startswith("READY "):
                    # READY is printed after attach(), which has bound and listens.
                    self.port = int(line.split()[1].rsplit(":", 1)[1].split("/", 1)[0])
                    return
            if self._proc.poll() is not None:
                raise RuntimeError(f"exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no READY line after {timeout_s}s")
            time.sleep(_POLL_S)

    def pause(self) -> None:
        """SIGSTOP: a hung camera. Connections stay open but nothing more arrives."""
        if self._proc is not None and self.running and not self._paused:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def kill(self) -> None:
        """SIGKILL: a dead camera. The kernel closes its sockets (clients see EOF/RST)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc = None
        self._paused = False
        self._close_logs()

    def stop(self) -> None:
        """SIGTERM (after SIGCONT if paused), then SIGKILL if it does not exit."""
        if self._proc is not None:
            self.resume()
            stop_process(self._proc)
            self._proc = None
        self._close_logs()

    def restart(self, *, kill: bool = False) -> None:
        """Bring the camera back on the same port (and URL)."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_text(self) -> str:
        parts = []
        for name in ("stdout", "stderr"):
            path = Path(self._dir.name) / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def _close_logs(self) -> None:
        for log in (self._stdout, self._stderr):
            if log is not None:
                log.close()
        self._stdout = self._stderr = None

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        source = f"file={self.file}" if self.file else f"live pattern={self.pattern}"
        return f"RtspServer(port={self.port}, {source}, running={self.running})"
