"""A real OpenAI-compatible server for tests (mlx-vlm's, in ``.venv-mlx``) and a TCP proxy of
our own between it and streamd, to take it away or answer for it (429, 401) on demand."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MLX_PYTHON = REPO / ".venv-mlx" / "bin" / "python"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1
CHUNK = 65536


def mlx_server_unavailable_reason() -> str | None:
    """Why mlx-vlm's server cannot run here, or None."""
    if not MLX_PYTHON.is_file():
        return (
            f"{MLX_PYTHON} is missing: python3 -m venv .venv-mlx && .venv-mlx/bin/pip install"
            ' "mlx[cpu]" "mlx-vlm==0.7.10"'
        )
    probe = subprocess.run(
        [
            str(MLX_PYTHON),
            "-c",
            "import importlib.util as u, sys; sys.exit(not u.find_spec('mlx_vlm'))",
        ],
        check=False,
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return 'mlx_vlm is not installed in .venv-mlx: pip install "mlx[cpu]" "mlx-vlm==0.7.10"'
    return None


def require_mlx_server() -> None:
    """Skip without mlx-vlm's server, except under CI, where that is a failure."""
    reason = mlx_server_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"mlx-vlm server unavailable under CI: {reason}")
    pytest.skip(f"mlx-vlm server unavailable: {reason}")


def free_port() -> int:
    """A TCP port nothing listens on (right now) on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MlxVlmServer:
    """``python -m mlx_vlm.server`` serving one checkpoint directory on a free port.

    The model id it serves is the directory exactly as passed (``GET /v1/models``).
    """

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.model_id = str(model_dir)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MlxVlmServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOP_LOGPROBS_K": "20"}
        argv = [str(MLX_PYTHON), "-m", "mlx_vlm.server", "--model", self.model_id]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"mlx-vlm server exited: {self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == httpx.codes.OK:
                    return
            time.sleep(POLL_S)
        raise RuntimeError(
            f"mlx-vlm server not ready after {START_TIMEOUT_S:.0f}s: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's output."""
        text = self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __exit__(self, *_exc: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``: forwards, or answers for it.

    ``answer(status, headers, times)`` makes the next ``times`` connections get that status
    for their first request (read in full first, then the connection is closed); ``stop()``
    takes the server away (connections refused); ``start()`` brings it back on the same port.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.answered = 0
        self.accepted = 0  # connections: a client keeping N requests open opens N
        self._lock = threading.Lock()
        self._canned: tuple[int, dict[str, str], int] | None = None
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def answer(self, status: int, headers: dict[str, str] | None = None, times: int = 1) -> None:
        """Answer the next ``times`` requests with ``status`` instead of forwarding them.

        Open connections are closed, so the next request comes on a new one.
        """
        with self._lock:
            self._canned = (status, headers or {}, times)
        self._drop_connections()

    def start(self) -> None:
        """Listen (again) on ``port``."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every connection: the server is gone."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_canned(self) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            if self._canned is None:
                return None
            status, headers, times = self._canned
            self._canned = (status, headers, times - 1) if times > 1 else None
            self.answered += 1
            return status, headers

    def _serve(self, client: socket.socket) -> None:
        canned = self._take_canned()
        if canned is not None:
            with contextlib.suppress(OSError), client:
                _read_request(client)
                status, headers = canned
                head = [f"HTTP/1.1 {status} Canned", "Content-Length: 0", "Connection: close"]
                head += [f"{name}: {value}" for name, value in headers.items()]
                client.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets.append(upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)


def _read_request(sock: socket.socket) -> None:
    """Read one HTTP request (head and ``Content-Length`` body) off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(CHUNK)
        if not chunk:
            return
        body += chunk


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(CHUNK):
            sink.sendall(chunk)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
