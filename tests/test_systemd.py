from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
