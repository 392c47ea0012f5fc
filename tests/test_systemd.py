from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamd.sdnotify import SystemdNotifier

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "streamd.service"
STREAMD = Path(sys.executable).with_name("streamd")


@pytest.fixture
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing under CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze not installed")
    return tool


def test_unit_has_the_lifecycle_contract() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "LoadCredential=mqtt:",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "CacheDirectory=streamd",
    ):
        assert line in text, line


def test_exposure_is_ok_or_better(analyze: str) -> None:
    # --threshold=20: fail above an exposure of 2.0 ("OK" is up to 3.9 in systemd's scale).
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "Overall exposure level for streamd.service:" in proc.stdout


def test_verify_is_clean(analyze: str, tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's streamd.
    unit = tmp_path / "streamd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/streamd", str(STREAMD)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


# --- SystemdNotifier against a real AF_UNIX datagram socket -----------------------------------


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    with receiver(path) as sock:
        yield path, sock


def test_notifier_sends_the_lifecycle_over_a_datagram_socket(
    notify_path: tuple[str, socket.socket],
) -> None:
    path, sock = notify_path
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.enabled
    assert notifier.watchdog_interval_s == 2.0  # half the period
    assert notifier.ready("2 streams")
    assert notifier.watchdog()
    assert notifier.stopping()
    received = [sock.recv(4096).decode() for _ in range(3)]
    assert received == ["READY=1\nSTATUS=2 streams", "WATCHDOG=1", "STOPPING=1"]


def test_notifier_abstract_namespace_address() -> None:
    name = f"streamd-test-{uuid.uuid4().hex}"
    with receiver("\0" + name) as sock:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_notifier_without_systemd_or_listener_never_raises(tmp_path: Path) -> None:
    off = SystemdNotifier({})
    assert not off.enabled
    assert off.watchdog_interval_s is None
    assert not off.ready()
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    assert not gone.watchdog()  # sending failed: False, no exception


def test_watchdog_for_another_pid_is_not_ours() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval_s is None
