from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamd.cli import _analyze_knobs, main
from streamd.errors import ExitCode
from streamd.scoring.registry import BACKENDS as REGISTRY
from tests.media import ClipSet

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
        "streams[0].url: field required",
        "streams[1].fps: unknown key",
        "extra: unknown key",
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


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run streamd with stdout a pipe whose reader has already gone (`... | head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "streamd", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)


def test_version_into_a_closed_pipe_is_quiet() -> None:
    proc = closed_pipe_run("version")
    assert proc.stderr == ""
    assert proc.returncode == 1


def test_version_piped_to_head() -> None:
    with (
        subprocess.Popen(
            [sys.executable, "-m", "streamd", "version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as version,
        subprocess.Popen(
            ["head", "-1"], stdin=version.stdout, stdout=subprocess.PIPE, text=True
        ) as head,
    ):
        assert version.stdout is not None
        version.stdout.close()  # head alone reads it, as in a shell pipeline
        first, _ = head.communicate(timeout=60)
        _, errors = version.communicate(timeout=60)
    assert first.startswith("streamd ")
    assert errors == ""


def test_analyze_into_a_closed_pipe_still_writes_json(clips: ClipSet, tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    proc = closed_pipe_run(
        "analyze", str(clips.activity.path), "--backend", "motion", "--json", str(out)
    )
    assert "Traceback" not in proc.stderr
    assert "BrokenPipe" not in proc.stderr
    assert proc.returncode == 1
    assert json.loads(out.read_text())["complete"] is True


def test_check_config_hides_awkward_passwords(tmp_path: Path) -> None:
    config = tmp_path / "streamd.yaml"
    url = "rtsp://admin:p@ss/w0rd s3cret@cam.local:554/stream1?token=abc123"
    config.write_text(
        f"mqtt: {{enabled: false}}\nstreams:\n  - {{name: door, url: {json.dumps(url)}}}\n"
    )
    proc = streamd("check-config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "rtsp://admin:***@cam.local:554/stream1?token=***" in proc.stdout
    for secret in ("p@ss", "w0rd", "s3cret", "abc123"):
        assert secret not in proc.stdout


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "/m is a file, not a model directory: set model.id to a",
            "/m is a file, not a model directory: set --model to a",
        ),
        ("check model.id and model.device", "check --model and --device"),
        (
            "window_s (40) x sample_fps (10) = 400 frames",
            "--window-s (40) x --sample-fps (10) = 400 frames",
        ),
        ("the prompt is too long for this model", "the prompt is too long for this model"),
    ],
)
def test_analyze_names_its_own_flags(message: str, shown: str) -> None:
    assert _analyze_knobs(message) == shown


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--backend", "openai", "--device", "cpu"],
            "--device: does not apply to --backend openai (only to transformers, mlx, motion)",
        ),
        (
            ["--backend", "motion", "--base-url", "http://gpu:8000/v1"],
            "--base-url: does not apply to --backend motion (only to openai)",
        ),
        (
            ["--backend", "openai", "--max-in-flight", "0"],
            "--max-in-flight: input should be greater than or equal to 1",
        ),
        (
            ["--backend", "openai", "--base-url", "gpu:8000"],
            "--base-url: must be an http:// or https:// URL, not 'gpu:8000'",
        ),
    ],
)
def test_each_backend_takes_its_own_flags(
    clips: ClipSet, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert main(["analyze", str(clips.static.path), *args]) == ExitCode.USAGE
    assert capsys.readouterr().err.splitlines() == [f"streamd analyze: {expected}"]


def test_backend_flags_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    for spec in REGISTRY.values():
        for option in spec.options:
            assert option.flag in text
