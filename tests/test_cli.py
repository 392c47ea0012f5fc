from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamd.cli import main

REPO = Path(__file__).resolve().parent.parent


def streamd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_version_lists_libraries() -> None:
    proc = streamd("version")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("streamd ")
    assert any(line.startswith("av ") for line in lines)
    assert any(line.startswith("torch ") for line in lines)


def test_import_stays_light() -> None:
    code = (
        "import sys, streamd, streamd.cli, streamd.config; "
        "print(sorted(m for m in ('torch','av','mlx','transformers') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_check_config_valid() -> None:
    proc = streamd("check-config", str(REPO / "config/minimal.yaml"))
    assert proc.returncode == 0
    assert "frontdoor" in proc.stdout
    assert "valid" in proc.stdout


def test_check_config_invalid_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams:\n  - {name: a}\n  - {name: a, url: x, fps: 2}\nextra: 1\n")
    proc = streamd("check-config", str(bad))
    assert proc.returncode == 78
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "extra: unknown key",
        "streams[0].url: field required",
        "streams[1].fps: unknown key",
    ]


def test_run_invalid_config_exits_78_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams: []\n")
    proc = streamd("run", "-c", str(bad))
    assert proc.returncode == 78
    assert proc.stderr.strip() == "streams: must list at least one stream"


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["analyze"])
    assert caught.value.code == 2
    assert main([]) == 2
    capsys.readouterr()
