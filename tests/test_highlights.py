from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import pytest

from streamd import highlights
from streamd.cli import _analyze_configs, build_parser
from streamd.config import ModelConfig, StreamConfig
from streamd.highlights import (
    Analysis,
    AnalyzeOptions,
    Highlight,
    ProgressBar,
    ScoredSpan,
    ended_early,
    expected_windows,
    format_span,
    merge_highlights,
    probe,
)
from streamd.highlights import analyze as analyze_file
from streamd.reel import plan_segments
from streamd.timefmt import format_clock
from tests.media import ClipInfo, ClipSet, Segment, render_frames, rgb_to_yuv420p, write_clip
from tests.slow_backend import SlowBackend
from tests.waiting import eventually


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
    assert set(result) == {
        "video",
        "duration_s",
        "model",
        "profile",
        "windows",
        "complete",
        "analyzed_s",
        "highlights",
    }
    assert result["complete"] is True
    assert result["analyzed_s"] == [0.0, pytest.approx(60, abs=0.2)]
    assert "truncated" not in proc.stderr
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
        (["{clip}", "--overlap-s", "30"], "--overlap-s: must be >= 0 and below --window-s (30)"),
        (["{clip}", "--overlap-s", "-1"], "--overlap-s: must be >= 0 and below --window-s (30)"),
        (["{clip}", "--min-significance", "11"], "--min-significance: input should be less"),
        (["{clip}", "--sample-fps", "0"], "--sample-fps: input should be greater than 0"),
        (["{clip}", "--sample-fps", "500"], "--sample-fps: input should be less than or equal"),
        (["{clip}", "--window-s", "5000"], "--window-s: input should be less than or equal"),
        (["{clip}", "--window-s", "inf"], "--window-s: input should be a finite number"),
        (["{clip}", "--window-s", "nan"], "--window-s: input should be a finite number"),
        (["{clip}", "--sample-fps=-inf"], "--sample-fps: input should be a finite number"),
        (["{clip}", "--window-s", "3600"], "--window-s (3600) x --sample-fps (1) = 3600 frames"),
        (["{clip}", "--max-highlights", "0"], "--max-highlights: must be >= 1"),
        (["{clip}", "--max-new-tokens", "0"], "--max-new-tokens: input should be greater"),
        (["{clip}", "--device", "gpu"], "--device: must be auto, cpu, mps, cuda or cuda:N"),
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
    assert lines[0].startswith("streamd analyze: ")
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_analyze_reports_every_bad_argument(clips: ClipSet) -> None:
    proc = analyze(
        str(clips.static.path), "--backend", "motion", "--window-s", "inf", "--sample-fps", "500"
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "streamd analyze: --sample-fps: input should be less than or equal to 120",
        "streamd analyze: --window-s: input should be a finite number",
    ]


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
    assert "set --model to" in lines[0]  # analyze's knob, not the config file's model.id
    assert "model.id" not in lines[0]


def test_analyze_model_that_is_a_file_says_so(clips: ClipSet, tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    proc = analyze(str(clips.static.path), "--backend", "transformers", "--model", str(weights))
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"{weights} is a file, not a model directory: set --model to" in line
    assert "does not exist" not in line


# --- output paths: checked before the analysis, never the input ---------------------------------


@pytest.fixture
def video(clips: ClipSet, tmp_path: Path) -> Path:
    """A private copy of a clip: a test that overwrote it would not spoil the session's."""
    copy = tmp_path / "match.mp4"
    shutil.copyfile(clips.activity.path, copy)
    return copy


@pytest.mark.parametrize("flag", ["--clip-out", "--json"])
@pytest.mark.parametrize("alias", ["same", "relative", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused(
    video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, alias: str
) -> None:
    before = video.read_bytes()
    monkeypatch.chdir(tmp_path)
    if alias == "same":
        out = str(video)
    elif alias == "relative":
        out = "./sub/../match.mp4"
        (tmp_path / "sub").mkdir()
    elif alias == "symlink":
        out = str(tmp_path / "link.mp4")
        os.symlink(video, out)
    else:
        out = str(tmp_path / "hard.mp4")
        os.link(video, out)
    proc = analyze(str(video), "--backend", "motion", flag, out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"streamd analyze: {flag}: {out}: is the input video; refusing to overwrite it"
    ]
    assert proc.stdout == ""
    assert video.read_bytes() == before


@pytest.mark.parametrize(
    ("flag", "out", "message"),
    [
        ("--clip-out", "{tmp}", "--clip-out: {tmp}: is a directory"),
        ("--json", "{tmp}", "--json: {tmp}: is a directory"),
        ("--clip-out", "{tmp}/reel.xyz", "FFmpeg has no container for '.xyz' files"),
        ("--clip-out", "{tmp}/reel.ts", "a '.ts' file cannot hold the reel's video"),
        ("--clip-out", "{tmp}/reel", "no file extension"),
        ("--clip-out", "{tmp}/nope/reel.mp4", "directory {tmp}/nope does not exist"),
        ("--json", "{tmp}/nope/h.json", "--json: {tmp}/nope/h.json: directory {tmp}/nope does not"),
    ],
)
def test_bad_output_path_is_refused_before_the_analysis(
    video: Path, tmp_path: Path, flag: str, out: str, message: str
) -> None:
    out, message = out.format(tmp=tmp_path), message.format(tmp=tmp_path)
    proc = analyze(str(video), "--backend", "motion", flag, out)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()  # one line, and no progress: nothing was analysed
    assert line.startswith(f"streamd analyze: {flag}: {out}: ")
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["match.mp4"]  # no scratch file left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_directory_is_refused(video: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = analyze(str(video), "--backend", "motion", "--json", str(locked / "h.json"))
    assert proc.returncode == 2
    assert f"directory {locked} is not writable" in proc.stderr


def test_json_and_clip_out_must_differ(video: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out.mp4")
    proc = analyze(str(video), "--backend", "motion", "--json", out, "--clip-out", out)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"streamd analyze: --clip-out: {out}: is the --json file too"
    ]


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov"])
def test_reel_containers(video: Path, tmp_path: Path, ext: str) -> None:
    reel = tmp_path / f"reel{ext}"
    proc = analyze(
        str(video),
        "--backend",
        "motion",
        "--window-s",
        "4",
        "--overlap-s",
        "1",
        "--clip-out",
        str(reel),
    )
    assert proc.returncode == 0, proc.stderr
    with av.open(str(reel)) as container:
        assert sum(1 for _ in container.decode(video=0)) > 0


def test_json_dash_is_stdout_once(video: Path) -> None:
    proc = analyze(
        str(video), "--backend", "motion", "--window-s", "4", "--overlap-s", "1", "--json", "-"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # two documents would not parse
    assert result["complete"] is True
    assert not Path("-").exists()


# --- interrupted runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> ClipInfo:
    """120 s of moving bars: a few seconds of analysis at 10 frames per second."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    return write_clip(path, [Segment(60, "bars"), Segment(60, "black")])


PROGRESS_RE = re.compile(r"^(\d+)/(\d+) windows")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_analyze_keeps_what_was_scored(
    long_video: ClipInfo, tmp_path: Path, signum: int
) -> None:
    out_json = tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "streamd", "analyze", str(long_video.path), "--backend", "motion"]
    cmd += ["--window-s", "2", "--overlap-s", "0", "--sample-fps", "10", "--min-significance", "1"]
    cmd += ["--json", str(out_json), "--clip-out", str(tmp_path / "reel.mp4")]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # the first progress line: a window is done
            seen.append(line)
            if PROGRESS_RE.match(line):
                break
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    stderr = "".join(seen) + stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "CancelledError" not in stderr
    assert "KeyboardInterrupt" not in stderr
    assert "interrupted" in stderr.splitlines()[-1]
    result = json.loads(out_json.read_text())
    assert json.loads(stdout) == result
    assert result["complete"] is False
    assert 1 <= result["windows"] < 60
    assert result["highlights"]
    assert result["analyzed_s"][1] == pytest.approx(2.0 * result["windows"])
    assert not (tmp_path / "reel.mp4").exists()  # no reel of a partial run


async def test_cancelled_analysis_stops_its_thread_and_task(long_video: ClipInfo) -> None:
    video = str(long_video.path)
    stream = StreamConfig(
        name="analyze", url=video, live=False, sample_fps=10, window_s=2, stride_s=2
    )
    options = AnalyzeOptions(video, ModelConfig(backend="motion"), stream)
    analysis = Analysis(model_id="motion")
    task = asyncio.create_task(analyze_file(options, probe(video), analysis, io.StringIO()))
    await eventually(lambda: analysis.spans, within_s=30, what="a scored window")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(30):
            await task
    assert not [t.name for t in threading.enumerate() if t.name.startswith("streamd[analyze]")]
    assert asyncio.all_tasks() == {asyncio.current_task()}  # the model task was awaited
    assert analysis.spans
    assert analysis.complete is False


# --- a file that ends early ---------------------------------------------------------------------


def test_truncated_file_with_index_in_front_says_where_it_ended(tmp_path: Path) -> None:
    # moov first (faststart): the cut file opens and states the full 120 s.
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i, rgb in enumerate(render_frames([Segment(120, "bars")], 64, 48, 10)):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = whole.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 5])
    proc = analyze(str(cut), "--backend", "motion", "--window-s", "24", "--overlap-s", "0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["duration_s"] == pytest.approx(120)
    assert result["complete"] is True
    start, end = result["analyzed_s"]
    assert start == 0.0
    assert 5 < end < 60
    warnings = [line for line in proc.stderr.splitlines() if "truncated?" in line]
    assert len(warnings) == 1, proc.stderr
    assert f"video ended at {format_clock(end)} of 2:00 (truncated?)" in warnings[0]


def test_ended_early_allows_the_last_sample_period() -> None:
    whole = Analysis("m", spans((0, 30, 1), (25, 59.5, 1)), complete=True)
    assert ended_early(60.0, whole, sample_fps=1) is None
    cut = Analysis("m", spans((0, 24, 1)), complete=True)
    assert ended_early(120.0, cut, sample_fps=1) == 24
    assert ended_early(120.0, Analysis("m", spans((0, 24, 1))), sample_fps=1) is None  # partial
    assert ended_early(0.0, cut, sample_fps=1) is None  # no stated duration


@pytest.mark.parametrize(
    ("seconds", "with_hours", "text"),
    [
        (0, None, "0:00"),
        (-3, None, "0:00"),
        (65.9, None, "1:05"),
        (3599, None, "59:59"),
        (3600, None, "1:00:00"),
        (65, True, "0:01:05"),
        (3725, False, "62:05"),
    ],
)
def test_format_clock(seconds: float, with_hours: bool | None, text: str) -> None:
    assert format_clock(seconds, with_hours) == text


# --- describing only what can become a highlight ------------------------------------------------


@pytest.mark.parametrize("describe_all", [False, True])
async def test_only_windows_that_can_become_highlights_are_described(
    clips: ClipSet, describe_all: bool
) -> None:
    video = str(clips.long.path)  # black 10, bars 5, black 15, noise 10, black 20 (60 s)
    args = build_parser().parse_args(
        ["analyze", video, "--backend", "motion", "--window-s", "10", "--overlap-s", "5"]
        + (["--describe-all"] if describe_all else [])
    )
    built = _analyze_configs(args)
    assert not isinstance(built, list), built
    stream, model = built
    analysis = Analysis(model_id="motion")
    await analyze_file(AnalyzeOptions(video, model, stream), probe(video), analysis, io.StringIO())
    quiet = [s for s in analysis.spans if s.significance is not None and s.significance < 6]
    loud = [s for s in analysis.spans if s.significance is not None and s.significance >= 6]
    assert quiet
    assert loud
    assert all(s.description for s in loud)  # a highlight always has its description
    assert [bool(s.description) for s in quiet] == [describe_all] * len(quiet)


async def test_a_window_slower_than_the_stall_guard_does_not_abort_a_file(
    clips: ClipSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each window takes 0.3 s against a 0.05 s model.timeout_s: a live daemon calls that a
    # stall; a file keeps going while windows come back.
    monkeypatch.setattr(highlights, "create_backend", lambda _model: SlowBackend(delay_s=0.3))
    video = str(clips.static.path)
    stream = StreamConfig(name="analyze", url=video, live=False, window_s=2, stride_s=2)
    model = ModelConfig(backend="motion", timeout_s=0.05)
    assert model.stall_timeout_s < 0.3
    analysis = Analysis(model_id="motion")
    async with asyncio.timeout(60):
        await analyze_file(
            AnalyzeOptions(video, model, stream), probe(video), analysis, io.StringIO()
        )
    assert analysis.complete
    assert len(analysis.spans) >= 2
    assert all(span.significance == 1 for span in analysis.spans)  # every window was scored


async def test_consecutive_windows_of_a_file_share_a_batch(
    clips: ClipSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An in-process model that takes 4 windows a call gets several of the file's at once.
    backend = SlowBackend(delay_s=0.2, max_batch=4)
    monkeypatch.setattr(highlights, "create_backend", lambda _model: backend)
    video = str(clips.long.path)
    stream = StreamConfig(name="analyze", url=video, live=False, window_s=4, stride_s=2)
    analysis = Analysis(model_id="motion")
    async with asyncio.timeout(60):
        await analyze_file(
            AnalyzeOptions(video, ModelConfig(backend="motion"), stream),
            probe(video),
            analysis,
            io.StringIO(),
        )
    sizes = [len(call) for call in backend.calls]
    assert max(sizes) >= 3, sizes
    assert sum(sizes) == len(analysis.spans)
    starts = [span.start_s for span in analysis.spans]
    assert starts == sorted(starts)  # recorded in time order
