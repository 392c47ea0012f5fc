from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from streamd.highlights import (
    Highlight,
    ProgressBar,
    ScoredSpan,
    expected_windows,
    format_span,
    merge_highlights,
)
from streamd.reel import plan_segments
from tests.media import ClipSet


def spans(*items: tuple[float, float, int | None]) -> list[ScoredSpan]:
    return [ScoredSpan(s, e, sig, f"w{s:g}") for s, e, sig in items]


def test_overlapping_significant_windows_merge_into_one() -> None:
    result = merge_highlights(spans((0, 30, 3), (25, 55, 8), (50, 80, 9), (75, 105, 2)), 6, 10)
    assert result == [Highlight(25, 80, 9, "w50")]


def test_ranked_by_significance_then_time() -> None:
    result = merge_highlights(
        spans((0, 10, 7), (20, 30, 9), (40, 50, 7), (60, 70, 10), (80, 90, 5)), 6, 10
    )
    assert [(h.start_s, h.significance) for h in result] == [(60, 10), (20, 9), (0, 7), (40, 7)]


def test_limits_and_unreadable() -> None:
    result = merge_highlights(spans((0, 10, 7), (20, 30, None), (40, 50, 8)), 6, 1)
    assert [h.start_s for h in result] == [40]
    assert merge_highlights(spans((0, 10, None)), 1, 10) == []


def test_tie_keeps_the_earliest_description() -> None:
    (h,) = merge_highlights(spans((0, 10, 8), (5, 15, 8)), 6, 10)
    assert (h.start_s, h.end_s, h.description) == (0, 15, "w0")


def test_adjacent_windows_are_separate_moments() -> None:
    assert len(merge_highlights(spans((0, 10, 8), (10, 20, 8)), 6, 10)) == 2


@pytest.mark.parametrize(
    ("start", "end", "text"),
    [
        (135, 165, "2:15-2:45"),
        (0, 9.9, "0:00-0:09"),
        (3590, 3620, "0:59:50-1:00:20"),
        (3700, 3730, "1:01:40-1:02:10"),
    ],
)
def test_timestamp_format(start: float, end: float, text: str) -> None:
    assert format_span(start, end) == text


def test_expected_windows() -> None:
    assert expected_windows(5400, 30, 25) == 216  # the spec's example
    assert expected_windows(10, 30, 25) == 1
    assert expected_windows(60, 10, 5) == 11


def test_reel_plan() -> None:
    assert plan_segments([(30, 40), (0, 10), (5, 15), (50, 50)]) == [(0, 15), (30, 40)]


def test_progress_bar_without_tty(tmp_path: Path) -> None:
    out = (tmp_path / "p").open("w+")
    ticks = iter(range(100))
    bar = ProgressBar(20, out, clock=lambda: float(next(ticks)))
    for _ in range(20):
        bar.advance()
    bar.close()
    out.seek(0)
    lines = out.read().splitlines()
    assert len(lines) == 11  # 0%..100% in tenths
    assert lines[-1] == "20/20 windows, 0:00 left"
    out.close()


# --- end to end through the CLI -----------------------------------------------------------------


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamd", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_analyze_motion_end_to_end(clips: ClipSet, tmp_path: Path) -> None:
    clip = clips.long  # black 10, bars 5, black 15, noise 10, black 20 (60 s)
    out_json, reel = tmp_path / "h.json", tmp_path / "reel.mp4"
    proc = analyze(
        str(clip.path),
        "--backend",
        "motion",
        "--window-s",
        "10",
        "--overlap-s",
        "5",
        "--json",
        str(out_json),
        "--clip-out",
        str(reel),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads(out_json.read_text())
    assert set(result) == {"video", "duration_s", "model", "profile", "windows", "highlights"}
    assert result["model"] == "motion"
    assert result["profile"] == "highlights"
    assert result["windows"] == 11
    assert result["duration_s"] == pytest.approx(60, abs=0.2)
    got = [(h["start_s"], h["end_s"], h["significance"]) for h in result["highlights"]]
    # Bars (10-15 s) and noise (30-40 s), each seen by overlapping windows: two moments.
    assert got == [(5.0, 20.0, 10), (25.0, 45.0, 10)]
    assert [h["timestamp"] for h in result["highlights"]] == ["0:05-0:20", "0:25-0:45"]
    for h in result["highlights"]:
        assert 0 <= h["start_s"] < h["end_s"] <= result["duration_s"]
        assert set(h) == {"timestamp", "start_s", "end_s", "description", "significance"}
    assert "windows" in proc.stderr  # the progress bar
    with av.open(str(reel)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
    assert frames == pytest.approx(35 * clip.fps, abs=2)  # 15 s + 20 s of highlights


def test_analyze_tail_window_stays_inside_the_video(clips: ClipSet) -> None:
    proc = analyze(
        str(clips.activity.path),
        "--backend",
        "motion",
        "--window-s",
        "6",
        "--overlap-s",
        "1",
        "--min-significance",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["windows"] == 3  # 0-6, 5-11, 10-16
    assert max(h["end_s"] for h in result["highlights"]) <= 16.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nope/match.mp4"], "/nope/match.mp4: no such file"),
        (["{notvideo}"], "not a readable video"),
        (["{clip}", "--overlap-s", "30"], "--overlap-s must be >= 0 and below --window-s"),
        (["{clip}", "--min-significance", "11"], "--min-significance must be 1-10"),
        (["{clip}", "--sample-fps", "0"], "--sample-fps must be > 0"),
        (["{clip}", "--device", "gpu"], "must be auto, cpu, mps, cuda or cuda:N"),
    ],
)
def test_analyze_bad_input_exits_2_with_one_line(
    clips: ClipSet, tmp_path: Path, args: list[str], message: str
) -> None:
    notvideo = tmp_path / "notes.mp4"
    notvideo.write_text("not a video at all\n" * 100)
    argv = [a.format(clip=clips.static.path, notvideo=notvideo) for a in args]
    proc = analyze(*argv, "--backend", "motion")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_analyze_unopenable_truncated_mp4_exits_2(clips: ClipSet) -> None:
    proc = analyze(str(clips.truncated_mp4), "--backend", "motion")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_analyze_truncated_file_gives_what_it_has(clips: ClipSet) -> None:
    proc = analyze(
        str(clips.truncated),
        "--backend",
        "motion",
        "--window-s",
        "2",
        "--overlap-s",
        "0",
        "--min-significance",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["windows"] >= 1


def test_analyze_model_failure_exits_3(clips: ClipSet, tmp_path: Path) -> None:
    proc = analyze(
        str(clips.static.path),
        "--backend",
        "transformers",
        "--model",
        str(tmp_path / "no-such-model"),
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no-such-model" in lines[0]
