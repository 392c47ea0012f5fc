from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamd import __version__
from streamd.cli import main
from streamd.config import OpenAIModelConfig, StreamConfig
from streamd.errors import ExitCode
from streamd.highlights import Analysis, AnalyzeOptions, Highlight, ScoredSpan
from streamd.report import RunSettings, grab_thumbnails, moment_of, render_report, settings_of
from tests.chromium import ARGS as CHROMIUM_ARGS
from tests.chromium import CHROMIUM
from tests.media import ClipInfo, Segment, write_clip

WIDTH, HEIGHT = 160, 120
URL_ATTRS = {"src", "href", "xlink:href", "srcset", "poster", "action", "formaction", "data"}


@dataclass
class Page:
    """What a report holds, as html.parser sees it."""

    text: str
    tags: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    def all(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [
            attrs
            for name, attrs in self.tags
            if name == tag and (cls is None or cls in attrs.get("class", "").split())
        ]


class _Parser(HTMLParser):
    def __init__(self, page: Page) -> None:
        super().__init__(convert_charrefs=True)
        self.page = page
        self._cell: str | None = None
        self._buffer: list[str] = []
        self._key = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.page.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag in {"th", "td"}:
            self._cell, self._buffer = tag, []

    def handle_endtag(self, tag: str) -> None:
        if tag != self._cell:
            return
        text = "".join(self._buffer).strip()
        if tag == "th":
            self._key = text
        else:
            self.page.settings[self._key] = text
        self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._buffer.append(data)


# html.parser calls these hooks; naming them here tells vulture (scripts/check) they are used.
_PARSER_HOOKS = (_Parser.handle_starttag, _Parser.handle_endtag, _Parser.handle_data)


def parse(text: str) -> Page:
    page = Page(text)
    parser = _Parser(page)
    parser.feed(text)
    parser.close()
    return page


def assert_self_contained(page: Page, *, urls_in_text: bool = False) -> None:
    """Nothing points outside the file: only data: URIs and #anchors, no scripts, no imports.

    ``urls_in_text``: the page quotes text that holds URLs (escaped, so never followed).
    """
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in URL_ATTRS:
                assert value.startswith(("data:", "#")), (tag, name, value[:80])
    assert urls_in_text or "://" not in page.text
    for banned in ("<script", "<link", "@import", "url(", "<iframe", "<object", "<embed"):
        assert banned not in page.text.lower()


def analyze(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamd", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> ClipInfo:
    """20 s: black 4, bars 3 (4..7 s), black 5, noise 3 (12..15 s), gray 5."""
    script = [
        Segment(4, "black"),
        Segment(3, "bars"),
        Segment(5, "black"),
        Segment(3, "noise"),
        Segment(5, "gray"),
    ]
    path = tmp_path_factory.mktemp("report") / "match.mp4"
    return write_clip(path, script, width=WIDTH, height=HEIGHT)


@dataclass(frozen=True)
class Run:
    result: dict[str, object]
    page: Page
    path: Path


WINDOW_ARGS = ("--window-s", "4", "--overlap-s", "2", "--sample-fps", "2")


@pytest.fixture(scope="module")
def run(clip: ClipInfo) -> Run:
    """One real motion run over the clip, with --report and --json."""
    out = clip.path.parent / "report.html"
    out_json = clip.path.parent / "result.json"
    args = (*WINDOW_ARGS, "--report", str(out), "--json", str(out_json))
    proc = analyze(str(clip.path), "--backend", "motion", *args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out_json.read_text())
    assert json.loads(proc.stdout) == result
    return Run(result, parse(out.read_text(encoding="utf-8")), out)


# --- a real run -------------------------------------------------------------------------------


def test_report_is_written_and_self_contained(run: Run) -> None:
    assert run.path.stat().st_size > 0
    assert_self_contained(run.page)
    (meta,) = [a for a in run.page.all("meta") if a.get("name") == "viewport"]
    assert "width=device-width" in meta["content"]
    (body,) = run.page.all("body")
    assert body["data-complete"] == "true"
    assert run.page.all("p", "complete")
    assert run.page.settings["Run"] == "complete"


def test_one_decodable_thumbnail_per_highlight(run: Run) -> None:
    highlights = run.result["highlights"]
    assert isinstance(highlights, list)
    assert len(highlights) == 2  # the bars and the noise
    images = run.page.all("img")
    assert len(images) == len(highlights)
    for attrs in images:
        prefix = "data:image/jpeg;base64,"
        assert attrs["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(prefix) :])))
        assert picture.format == "JPEG"
        assert picture.size == (WIDTH, HEIGHT)  # at most 320 wide, never upscaled
        # The motion backend's best frame: the bars or the noise, not a black frame.
        assert np.asarray(picture.convert("L")).std() > 30
    assert [a["id"] for a in run.page.all("li", "card")] == ["h1", "h2"]


def test_plot_has_one_mark_per_analysed_window(run: Run) -> None:
    assert run.result["windows"] == 9
    (svg,) = run.page.all("svg")
    assert "plot" in svg["class"]
    marks = run.page.all("rect", "win")
    assert len(marks) == run.result["windows"]
    # Bars at 4..7 s: windows 2-6, 4-8, 6-10; noise at 12..15 s: 10-14, 12-16, 14-18.
    assert len(run.page.all("rect", "hot")) == 6
    assert len(run.page.all("rect", "hl")) == 2  # the highlights, shaded
    assert len(run.page.all("line", "min")) == 1  # --min-significance
    xs = [float(m["x"]) for m in marks]
    assert xs == sorted(xs)  # in video time order


def test_settings_table_shows_the_run(run: Run, clip: ClipInfo) -> None:
    settings = run.page.settings
    assert settings["Video"] == str(clip.path)
    assert settings["Model"] == "motion"
    assert settings["Backend"] == "motion"
    assert settings["Profile"] == "highlights"
    assert settings["Window"] == "4 s, overlap 2 s"
    assert settings["Sample rate"] == "2 fps"
    assert settings["Min significance"] == "6"
    assert settings["Max highlights"] == "10"
    assert settings["Describe all"] == "no"
    assert settings["Windows analysed"] == "9 of 9 expected"
    assert settings["Duration"] == "0:20 (20.0 s)"
    assert settings["streamd"] == __version__
    assert datetime.fromisoformat(settings["Date"]).tzinfo is not None


# --- the page itself (pure) -------------------------------------------------------------------


SETTINGS = RunSettings(
    video="/videos/<b>match</b>.mp4",
    duration_s=90.0,
    model="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    backend="transformers",
    profile="sports",
    window_s=30.0,
    overlap_s=5.0,
    sample_fps=1.0,
    min_significance=6,
    max_highlights=10,
    describe_all=False,
    windows=3,
    expected_windows=4,
    complete=True,
    started=datetime(2026, 11, 24, 19, 30, tzinfo=UTC),
    device="cuda",
    dtype="bfloat16",
)


EVIL = '<script>alert("x")</script><img src="https://evil.example/x.png" onerror="alert(1)">'


def jpeg(width: int = 8, height: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def test_model_text_is_escaped() -> None:
    spans = [
        ScoredSpan(0, 30, 2, ""),
        ScoredSpan(25, 55, 9, EVIL, 40.0),
        ScoredSpan(50, 80, None, ""),
    ]
    text = render_report(SETTINGS, spans, [Highlight(25, 55, 9, EVIL, 40.0)], [jpeg()])
    page = parse(text)
    assert "<script" not in text
    assert "&lt;script&gt;" in text
    assert len(page.all("img")) == 1  # only the thumbnail: the model's <img> is text
    assert_self_contained(page, urls_in_text=True)
    assert "<b>" not in text  # the file name too
    assert page.settings["Video"] == "/videos/<b>match</b>.mp4"
    assert page.settings["Device"] == "cuda"
    assert page.settings["Dtype"] == "bfloat16"
    assert len(page.all("rect", "unread")) == 1


def test_interrupted_before_any_window() -> None:
    text = render_report(replace(SETTINGS, windows=0, complete=False), [], [], [])
    page = parse(text)
    assert page.all("body")[0]["data-complete"] == "false"
    assert page.all("p", "incomplete")
    assert page.settings["Run"] == "incomplete (interrupted)"
    assert "no window was scored" in text
    assert page.all("rect", "win") == []
    assert page.all("img") == []


def test_highlight_without_a_picture_still_listed() -> None:
    text = render_report(
        SETTINGS, [ScoredSpan(0, 30, 8, "goal")], [Highlight(0, 30, 8, "goal")], [None]
    )
    page = parse(text)
    assert page.all("img") == []
    assert page.all("div", "nothumb")
    with pytest.raises(ValueError, match="0 thumbnails for 1 highlights"):
        render_report(SETTINGS, [], [Highlight(0, 30, 8, "goal")], [])


def test_settings_of_a_remote_model_hide_its_credentials(clip: ClipInfo) -> None:
    model = OpenAIModelConfig(base_url="http://user:s3cret@gpu:8000/v1", id="smol")
    stream = StreamConfig(name="analyze", url=str(clip.path), live=False, window_s=4, stride_s=3)
    analysis = Analysis(model_id="smol", spans=[ScoredSpan(0, 4, 3, "")])
    started = datetime(2026, 11, 24, 19, 30, tzinfo=UTC)
    got = settings_of(AnalyzeOptions(str(clip.path), model, stream), 20.0, analysis, started)
    assert (got.backend, got.server, got.device, got.dtype) == (
        "openai",
        "http://user:***@gpu:8000/v1",
        None,
        None,
    )
    assert (got.overlap_s, got.windows, got.expected_windows, got.complete) == (1, 1, 7, False)
    page = parse(render_report(got, analysis.spans, [], []))
    assert page.settings["Server"] == "http://user:***@gpu:8000/v1"
    assert "s3cret" not in page.text


def test_thumbnail_moment() -> None:
    assert moment_of(Highlight(10, 40, 8, "", best_s=12.5)) == 12.5
    assert moment_of(Highlight(10, 40, 8, "")) == 25
    assert moment_of(Highlight(10, 40, 8, "", best_s=99)) == 25  # outside its span


def test_thumbnails_past_the_end_and_of_no_video(clip: ClipInfo, tmp_path: Path) -> None:
    first, last = grab_thumbnails(str(clip.path), [5.0, 999.0], width=80)
    assert first is not None
    assert last is not None  # the last frame there is
    assert Image.open(io.BytesIO(first)).size == (80, 60)
    assert grab_thumbnails(str(tmp_path / "gone.mp4"), [1.0]) == [None]


# --- output path checks, interrupted runs -------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "extra", "expected"),
    [
        ("{video}", [], "{video}: is the input video; refusing to overwrite it"),
        (
            "{tmp}/../{tmp.name}/match.mp4",
            [],
            "{report}: is the input video; refusing to overwrite it",
        ),
        ("{tmp}/r.html", ["--json", "{tmp}/r.html"], "{report}: is the --json file too"),
        ("{tmp}/r.mp4", ["--clip-out", "{tmp}/r.mp4"], "{report}: is the --clip-out file too"),
        ("{tmp}/nope/r.html", [], "{report}: directory {tmp}/nope does not exist"),
        ("{tmp}", [], "{report}: is a directory"),
    ],
    ids=["input", "input-relative", "json", "clip-out", "no-dir", "dir"],
)
def test_bad_report_path_is_refused_before_the_analysis(
    clip: ClipInfo,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    report: str,
    extra: list[str],
    expected: str,
) -> None:
    video = tmp_path / "match.mp4"
    shutil.copyfile(clip.path, video)
    before = video.read_bytes()
    report = report.format(video=video, tmp=tmp_path)
    argv = [a.format(tmp=tmp_path) for a in extra]
    code = main(["analyze", str(video), "--backend", "motion", "--report", report, *argv])
    assert code == ExitCode.USAGE
    captured = capsys.readouterr()
    line = expected.format(video=video, tmp=tmp_path, report=report)
    assert captured.err.splitlines() == [f"streamd analyze: --report: {line}"]
    assert captured.out == ""  # nothing analysed
    assert video.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["match.mp4"]


def test_interrupted_run_writes_an_incomplete_report(tmp_path: Path) -> None:
    video = write_clip(tmp_path / "long.mp4", [Segment(60, "bars"), Segment(60, "black")])
    out, out_json = tmp_path / "partial.html", tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "streamd", "analyze", str(video.path), "--backend", "motion"]
    cmd += ["--window-s", "2", "--overlap-s", "0", "--sample-fps", "10", "--min-significance", "1"]
    cmd += ["--report", str(out), "--json", str(out_json)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first progress line: a window is done
            if " windows" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, stderr
    assert "Traceback" not in stderr
    result = json.loads(out_json.read_text())
    assert result["complete"] is False
    page = parse(out.read_text(encoding="utf-8"))
    assert page.all("body")[0]["data-complete"] == "false"
    assert page.all("p", "incomplete")
    assert page.settings["Run"] == "incomplete (interrupted)"
    assert len(page.all("rect", "win")) == result["windows"]
    assert len(page.all("img")) == len(result["highlights"]) >= 1
    assert_self_contained(page)


# --- a real browser ---------------------------------------------------------------------------


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_report_renders_in_chromium(run: Run, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"  # kept under pytest's tmp dir, to look at
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            *CHROMIUM_ARGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,1400",
            run.path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    picture = Image.open(shot).convert("RGB")
    assert picture.size == (1000, 1400)
    pixels = np.asarray(picture)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plot and thumbnails
    hot = np.all(np.abs(pixels.astype(int) - (0xCF, 0x3A, 0x0C)) < 24, axis=-1)
    assert hot.sum() > 5000  # the plot's bars above --min-significance
