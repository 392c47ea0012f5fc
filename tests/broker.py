"""A real mosquitto broker for tests: plain, TLS and password listeners, kill and restart."""

from __future__ import annotations

import atexit
import functools
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.01


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mosquitto_binary() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll until a TCP connect succeeds; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(_POLL_S)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait (bounded), then SIGKILL: never leaves a process behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=timeout_s)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server cert for 127.0.0.1/localhost (SAN) and a client cert."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=streamd test CA", cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (directory / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    )
    for name in ("server", "client"):
        cn = "localhost" if name == "server" else "streamd-test-client"
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=directory,
        )  # fmt: skip
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return TlsFiles(
        directory / "ca.crt",
        directory / "server.crt",
        directory / "server.key",
        directory / "client.crt",
        directory / "client.key",
    )


@functools.cache
def session_tls_files() -> TlsFiles:
    """TLS files made once per process (openssl runs take ~0.1 s each)."""
    directory = Path(tempfile.mkdtemp(prefix="streamd-tls-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_tls_files(directory)


class Mosquitto:
    """A mosquitto subprocess on 127.0.0.1; `port` stays the same across restarts."""

    def __init__(
        self,
        *,
        port: int | None = None,
        tls: bool = False,
        require_certificate: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tls = tls
        self.users = dict(users or {})
        self._tls_files = session_tls_files() if tls else None
        self._require_certificate = require_certificate
        self._dir = tempfile.TemporaryDirectory(prefix="streamd-mosquitto-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._write_config()

    @property
    def ca_certs(self) -> str | None:
        return str(self._tls_files.ca_cert) if self._tls_files else None

    @property
    def client_cert(self) -> str | None:
        return str(self._tls_files.client_cert) if self._tls_files else None

    @property
    def client_key(self) -> str | None:
        return str(self._tls_files.client_key) if self._tls_files else None

    @property
    def config_path(self) -> Path:
        return Path(self._dir.name) / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        # As root, mosquitto drops to user "mosquitto", who cannot read our temp files:
        # naming the current user keeps it as is (ignored when not root).
        user = pwd.getpwuid(self.config_path.parent.stat().st_uid).pw_name
        lines = [
            f"listener {self.port} {self.host}",
            f"user {user}",
            "persistence false",
            # stdout into a file is block-buffered; mosquitto flushes its own log file.
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if self._tls_files is not None:
            lines += [
                f"cafile {self._tls_files.ca_cert}",
                f"certfile {self._tls_files.server_cert}",
                f"keyfile {self._tls_files.server_key}",
                f"require_certificate {str(self._require_certificate).lower()}",
            ]
        if self.users:
            password_file = Path(self._dir.name) / "passwd"
            password_file.touch(mode=0o600)
            for name, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), name, password],
                    check=True,
                    capture_output=True,
                    timeout=10,
                )
            password_file.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_running(timeout_s)
            wait_for_port(self.host, self.port, timeout_s, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise RuntimeError(f"mosquitto did not start: {exc}\n{self.log_text()}") from exc

    def _wait_running(self, timeout_s: float) -> None:
        # The log line comes after the listener is bound. A bare connect check could
        # succeed against another process that holds the port while mosquitto fails.
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        marker = f"listen socket on port {self.port}."
        while True:
            log = self.log_text()
            if marker in log and " running" in log.rsplit(marker, 1)[1]:
                return
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto not running after {timeout_s}s")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL if it hangs): a clean broker shutdown."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing connections cleanly."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT_S)
            self._proc = None
        self._close_log()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

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
        return f"Mosquitto({self.host}:{self.port}, tls={self.tls}, running={self.running})"
