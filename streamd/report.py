"""``analyze --report``: one self-contained HTML page of a run: plot, thumbnails, settings."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import av
import av.container
import av.error
import av.video.frame
import av.video.stream
import PIL.Image

from streamd import __version__
from streamd.config import ModelConfig
from streamd.highlights import (
    Analysis,
    AnalyzeOptions,
    Highlight,
    ScoredSpan,
    expected_windows,
    format_span,
)
from streamd.log import redact_url
from streamd.scoring import resolve_backend_name
from streamd.timefmt import format_clock

logger = logging.getLogger(__name__)

THUMB_WIDTH_PX = 320
JPEG_QUALITY = 82
OPEN_TIMEOUT_S = 15.0
MAX_SIGNIFICANCE = 10
PLOT_W, PLOT_H = 800, 240
"""The plot's viewBox; it scales to the page, so these are only proportions."""
_LEFT, _RIGHT, _TOP, _BOTTOM = 34, 22, 22, 26
_TICK_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)
_TARGET_TICKS = 8


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What a run was asked to do and how far it got: the report's settings table."""

    video: str
    duration_s: float
    model: str
    backend: str
    profile: str
    window_s: float
    overlap_s: float
    sample_fps: float
    min_significance: int
    max_highlights: int
    describe_all: bool
    windows: int
    expected_windows: int
    complete: bool
    started: datetime
    device: str | None = None
    dtype: str | None = None
    server: str | None = None
    system_prompt: str | None = None
    prompt: str | None = None
    version: str = __version__


def settings_of(
    options: AnalyzeOptions, duration_s: float, analysis: Analysis, started: datetime
) -> RunSettings:
    """The settings of a run (pure): its options, and what its analysis got done."""
    model, stream = options.model, options.stream
    local = model if isinstance(model, ModelConfig) else None
    return RunSettings(
        video=options.video,
        duration_s=duration_s,
        model=analysis.model_id,
        backend=resolve_backend_name(model.backend),
        profile=stream.profile,
        window_s=stream.window_s,
        overlap_s=options.overlap_s,
        sample_fps=stream.sample_fps,
        min_significance=stream.min_significance,
        max_highlights=options.max_highlights,
        describe_all=stream.describe_below_min is True,
        windows=len(analysis.spans),
        expected_windows=expected_windows(duration_s, stream.window_s, stream.stride_s),
        complete=analysis.complete,
        started=started,
        device=None if local is None or local.backend == "motion" else local.device,
        dtype=None if local is None or local.backend == "motion" else local.dtype,
        server=None if isinstance(model, ModelConfig) else redact_url(model.base_url),
        system_prompt=stream.system_prompt,
        prompt=stream.prompt,
    )


def moment_of(highlight: Highlight) -> float:
    """The time a highlight's thumbnail shows: its best frame if known, else its middle."""
    best = highlight.best_s
    if best is not None and highlight.start_s <= best <= highlight.end_s:
        return best
    return (highlight.start_s + highlight.end_s) / 2


# --- pure: the page -------------------------------------------------------------------------


def render_report(
    settings: RunSettings,
    spans: Sequence[ScoredSpan],
    highlights: Sequence[Highlight],
    thumbnails: Sequence[bytes | None],
) -> str:
    """The whole report as one HTML document (pure: no I/O, no external references).

    Args:
        settings: What the run was asked to do and how far it got.
        spans: Every scored window, in time order (one mark each on the plot).
        highlights: The ranked highlights.
        thumbnails: One JPEG per highlight, in the same order (None: no picture).

    Every text that came from the model or the command line is escaped.
    """
    if len(thumbnails) != len(highlights):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(highlights)} highlights")
    name = _e(Path(settings.video).name)
    status = "complete" if settings.complete else "incomplete"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>streamd highlights: {name}</title>\n<style>{_CSS}</style>\n</head>\n"
        f'<body data-complete="{str(settings.complete).lower()}">\n'
        f"<header><h1>Highlights of {name}</h1>\n"
        f'<p class="status {status}">{_status_line(settings, spans)}</p></header>\n'
        '<section id="timeline"><h2>Significance over time</h2><div class="plotwrap">\n'
        f"{_plot_svg(settings, spans, highlights)}\n</div></section>\n"
        '<section id="highlights"><h2>Highlights</h2>\n'
        f"{_highlight_list(settings, highlights, thumbnails)}\n</section>\n"
        f'<section id="settings"><h2>Settings</h2>\n{_settings_table(settings, spans)}\n'
        f"</section>\n<footer>streamd {_e(settings.version)}</footer>\n</body>\n</html>\n"
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _status_line(settings: RunSettings, spans: Sequence[ScoredSpan]) -> str:
    covered = _e(_covered(spans))
    if settings.complete:
        return f"Complete run: {settings.windows} windows over {covered}."
    return (
        f"Incomplete: the run was interrupted after {settings.windows} of about"
        f" {settings.expected_windows} windows; the report covers {covered}"
        f" of {_e(format_clock(settings.duration_s))}."
    )


def _covered(spans: Sequence[ScoredSpan]) -> str:
    if not spans:
        return "nothing (no window was scored)"
    return format_span(spans[0].start_s, max(s.end_s for s in spans))


def _highlight_list(
    settings: RunSettings, highlights: Sequence[Highlight], thumbnails: Sequence[bytes | None]
) -> str:
    if not highlights:
        return (
            f'<p class="empty">No window scored {settings.min_significance} or more'
            " (--min-significance).</p>"
        )
    items = []
    for rank, (highlight, jpeg) in enumerate(zip(highlights, thumbnails, strict=True), 1):
        when = _e(format_span(highlight.start_s, highlight.end_s))
        at = _e(format_clock(moment_of(highlight)))
        if jpeg is None:
            picture = '<div class="nothumb">no picture</div>'
        else:
            data = base64.b64encode(jpeg).decode("ascii")
            picture = f'<img src="data:image/jpeg;base64,{data}" alt="frame at {at}">'
        description = _e(highlight.description) or '<span class="muted">(no description)</span>'
        items.append(
            f'<li id="h{rank}" class="card"><figure>{picture}'
            f"<figcaption>frame at {at}</figcaption></figure>"
            f'<div class="text"><p class="when"><a href="#h{rank}">#{rank}</a> {when}'
            f' <span class="score">{highlight.significance}/{MAX_SIGNIFICANCE}</span></p>'
            f'<p class="desc">{description}</p></div></li>'
        )
    return '<ol class="cards">' + "".join(items) + "</ol>"


def _settings_table(settings: RunSettings, spans: Sequence[ScoredSpan]) -> str:
    s = settings
    rows: list[tuple[str, object]] = [
        ("Video", s.video),
        ("Duration", f"{format_clock(s.duration_s)} ({s.duration_s:.1f} s)"),
        ("Model", s.model),
        ("Backend", s.backend),
    ]
    rows += [(label, v) for label, v in (("Device", s.device), ("Dtype", s.dtype)) if v]
    rows += [("Server", s.server)] if s.server else []
    rows += [
        ("Profile", s.profile),
        ("Window", f"{s.window_s:g} s, overlap {s.overlap_s:g} s"),
        ("Sample rate", f"{s.sample_fps:g} fps"),
        ("Min significance", s.min_significance),
        ("Max highlights", s.max_highlights),
        ("Describe all", "yes" if s.describe_all else "no"),
    ]
    rows += [(label, v) for label, v in (("System", s.system_prompt), ("Prompt", s.prompt)) if v]
    rows += [
        ("Windows analysed", f"{s.windows} of {s.expected_windows} expected"),
        ("Covered", _covered(spans)),
        ("Run", "complete" if s.complete else "incomplete (interrupted)"),
        ("Date", s.started.isoformat(sep=" ", timespec="seconds")),
        ("streamd", s.version),
    ]
    body = "".join(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>" for label, value in rows)
    return f"<table>{body}</table>"


def _plot_svg(
    settings: RunSettings, spans: Sequence[ScoredSpan], highlights: Sequence[Highlight]
) -> str:
    """Bars per window over video time, highlights shaded, a dashed --min-significance line."""
    end_s = max([settings.duration_s, *(s.end_s for s in spans), 1e-9])
    width, height = PLOT_W - _LEFT - _RIGHT, PLOT_H - _TOP - _BOTTOM

    def x(t: float) -> float:
        return _LEFT + width * min(max(t, 0.0), end_s) / end_s

    def y(score: float) -> float:
        return _TOP + height * (1 - score / MAX_SIGNIFICANCE)

    parts = [
        f'<svg class="plot" viewBox="0 0 {PLOT_W} {PLOT_H}" role="img" '
        f'aria-label="significance of each window over video time">'
    ]
    for score in range(0, MAX_SIGNIFICANCE + 1, 2):
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + width}" y1="{y(score):.1f}" '
            f'y2="{y(score):.1f}"/><text class="ylab" x="{_LEFT - 6}" y="{y(score) + 4:.1f}">'
            f"{score}</text>"
        )
    for tick in _ticks(end_s):
        parts.append(
            f'<text class="xlab" x="{x(tick):.1f}" y="{PLOT_H - 8}">{_e(format_clock(tick))}</text>'
        )
    for i, h in enumerate(highlights):
        parts.append(
            f'<a href="#h{i + 1}"><rect class="hl" x="{x(h.start_s):.1f}" y="{_TOP}" '
            f'width="{max(x(h.end_s) - x(h.start_s), 1):.1f}" height="{height}"/>'
            f'<text class="hlab" x="{x(h.start_s) + 3:.1f}" y="{_TOP - 6}">#{i + 1}</text></a>'
        )
    parts += [_bar(settings, spans, i, x, y) for i in range(len(spans))]
    done_s = max((s.end_s for s in spans), default=0.0)
    if not settings.complete and x(end_s) - x(done_s) > 1:
        mid = (x(done_s) + x(end_s)) / 2
        parts.append(
            f'<rect class="gap" x="{x(done_s):.1f}" y="{_TOP}" width="{x(end_s) - x(done_s):.1f}"'
            f' height="{height}"/><text class="glab" x="{mid:.1f}" y="{_TOP + height / 2:.1f}">'
            "not analysed</text>"
        )
    ym = y(settings.min_significance)
    parts.append(
        f'<line class="min" x1="{_LEFT}" x2="{_LEFT + width}" y1="{ym:.1f}" y2="{ym:.1f}"/>'
        f'<text class="mlab" x="{_LEFT + width - 2}" y="{ym - 4:.1f}">'
        f"min {settings.min_significance}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _bar(
    settings: RunSettings,
    spans: Sequence[ScoredSpan],
    i: int,
    x: Callable[[float], float],
    y: Callable[[float], float],
) -> str:
    """Window ``i`` as a bar over the time it alone starts: overlapping windows tile the axis."""
    span = spans[i]
    later = spans[i + 1].start_s if i + 1 < len(spans) else span.end_s
    stop = later if span.start_s < later < span.end_s else span.end_s
    x0, x1 = x(span.start_s), x(stop)
    gap = 1.0 if x1 - x0 > 3 else 0.0  # noqa: PLR2004 - a hairline between wide bars only
    bar_w = max(x1 - x0 - gap, 0.8)
    title = f"{format_span(span.start_s, span.end_s)}: "
    if span.significance is None:
        kind, top = "unread", y(0) - 3
        title += "unreadable answer"
    else:
        hot = span.significance >= settings.min_significance
        kind, top = ("hot" if hot else "quiet"), y(span.significance)
        title += f"{span.significance}/{MAX_SIGNIFICANCE}"
        title += f" {span.description}" if span.description else ""
    return (
        f'<rect class="win {kind}" x="{x0:.2f}" y="{top:.1f}" width="{bar_w:.2f}" '
        f'height="{y(0) - top:.1f}"><title>{_e(title)}</title></rect>'
    )


def _ticks(end_s: float) -> list[float]:
    step = next((s for s in _TICK_STEPS_S if end_s / s <= _TARGET_TICKS), _TICK_STEPS_S[-1])
    return [float(t) for t in range(0, int(end_s) + 1, step)]


_CSS = """
:root{--fg:#1b1f24;--muted:#59636e;--line:#d1d9e0;--hot:#cf3a0c;--quiet:#8c959f;--hl:#ffd8a8}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:#fff;margin:0 auto;max-width:60rem;padding:1rem;print-color-adjust:exact;
-webkit-print-color-adjust:exact}h1{font-size:1.5rem;margin:.2rem 0;overflow-wrap:anywhere}
h2{font-size:1.15rem;margin:1.4rem 0 .5rem}
.status{padding:.5rem .75rem;border-radius:6px;background:#dafbe1;margin:.5rem 0}
.status.incomplete{background:#fff1e5;border:2px solid var(--hot);font-weight:600}
.plotwrap{overflow-x:auto}svg.plot{width:100%;min-width:36rem;height:auto;display:block}
svg text{font-size:12px;fill:var(--muted)}.ylab{text-anchor:end}.xlab,.glab{text-anchor:middle}
.grid{stroke:var(--line);stroke-width:1}.min{stroke:var(--fg);stroke-width:1.5;stroke-dasharray:6 4}
svg .mlab{fill:var(--fg);text-anchor:end;paint-order:stroke;stroke:#fff;stroke-width:3px}
svg .hlab{fill:#9a3412}.hl{fill:var(--hl);opacity:.55}.gap{fill:#f6f8fa}.win.hot{fill:var(--hot)}
.win.quiet{fill:var(--quiet)}.win.unread{fill:#d0d7de}ol.cards{list-style:none;padding:0;margin:0}
.card{display:flex;flex-wrap:wrap;gap:.75rem 1rem;padding:.75rem 0;border-top:1px solid var(--line);
break-inside:avoid}figure{margin:0;flex:0 1 320px;max-width:100%}
figcaption{font-size:.8rem;color:var(--muted)}
figure img,.nothumb{display:block;width:100%;max-width:320px;height:auto;border-radius:4px;
background:#eee}
.nothumb{aspect-ratio:4/3;display:flex;align-items:center;justify-content:center;color:var(--muted)}
.text{flex:1 1 14rem;min-width:0}.when{margin:0;font-weight:600}
.when a{color:inherit;text-decoration:none}
.score{display:inline-block;margin-left:.4rem;padding:0 .45rem;border-radius:999px;
background:var(--hot);color:#fff;font-size:.85rem}.desc{margin:.3rem 0 0;overflow-wrap:anywhere}
.muted,.empty{color:var(--muted)}table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;vertical-align:top;padding:.3rem .5rem;border-top:1px solid var(--line)}
th{white-space:nowrap;color:var(--muted);font-weight:500;width:1%}td{overflow-wrap:anywhere}
footer{margin-top:1.5rem;font-size:.8rem;color:var(--muted)}
@media print{body{max-width:none;padding:0}svg.plot{min-width:0}a{color:inherit}}
"""


# --- I/O: thumbnails and the file -------------------------------------------------------------


def report_for(
    options: AnalyzeOptions,
    duration_s: float,
    analysis: Analysis,
    highlights: Sequence[Highlight],
    started: datetime,
) -> str:
    """The report of a run, thumbnails cut from its video. Blocking: call it off the loop."""
    thumbnails = grab_thumbnails(options.video, [moment_of(h) for h in highlights])
    settings = settings_of(options, duration_s, analysis, started)
    return render_report(settings, analysis.spans, highlights, thumbnails)


def grab_thumbnails(
    video: str, times: Sequence[float], width: int = THUMB_WIDTH_PX
) -> list[bytes | None]:
    """One JPEG per time (seconds from the start), at most ``width`` wide; None where it fails.

    Blocking (it decodes), so never on an event loop. A picture that cannot be had is logged
    and left out: the report is still worth having without it.
    """
    if not times:
        return []
    try:
        container = av.open(video, timeout=(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S))
    except (av.error.FFmpegError, OSError) as exc:
        logger.warning("%s: no thumbnails for the report (%s)", video, exc)
        return [None] * len(times)
    with container:
        stream = container.streams.video[0]
        origin = (container.start_time or 0) / av.time_base
        aspect = stream.sample_aspect_ratio or Fraction(1)
        thumbnails: list[bytes | None] = []
        for at in times:
            try:
                frame = _frame_at(container, stream, origin + at)
            except (av.error.FFmpegError, OSError) as exc:
                logger.warning("%s: no thumbnail at %s (%s)", video, format_clock(at), exc)
                frame = None
            thumbnails.append(None if frame is None else _jpeg(frame, width, aspect))
    return thumbnails


def _frame_at(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, at: float
) -> av.video.frame.VideoFrame | None:
    """The first frame shown at or after ``at`` (the last one if the video ends before)."""
    assert stream.time_base is not None  # noqa: S101 - every demuxed stream has one
    container.seek(max(0, int(at / stream.time_base)), stream=stream, backward=True)
    last = None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except (av.error.InvalidDataError, ValueError):
            continue  # a corrupt packet: try the next frame
        for frame in frames:
            last = frame
            if frame.time is not None and frame.time >= at - 1e-6:
                return frame
    return last


def _jpeg(frame: av.video.frame.VideoFrame, width: int, aspect: Fraction) -> bytes:
    """The frame as a JPEG, at most ``width`` wide, in its display aspect (never upscaled)."""
    shown_w = frame.width * float(aspect) if aspect > 0 else float(frame.width)
    out_w = max(1, min(width, round(shown_w)))
    out_h = max(1, round(out_w * frame.height / shown_w))
    pixels = frame.to_ndarray(width=out_w, height=out_h, format="rgb24", interpolation="BICUBIC")
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
