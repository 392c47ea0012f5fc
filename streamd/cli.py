"""Command line: ``run``, ``check-config``, ``analyze``, ``version``; owns the exit codes."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import os
import platform
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydantic import TypeAdapter, ValidationError

from streamd import __version__
from streamd.config import (
    BACKEND_NAMES,
    DEFAULT_MODEL_ID,
    LOG_FORMATS,
    LOG_LEVELS,
    PROFILES,
    Config,
    LogFormat,
    ModelSection,
    StreamConfig,
    StreamDefaults,
    format_validation_error,
    load_config,
    summarize,
)
from streamd.errors import ConfigError, ExitCode, ModelError, SourceError, StreamdError
from streamd.log import setup_logging
from streamd.scoring.registry import cli_options, spec_of

if TYPE_CHECKING:
    from streamd import highlights

logger = logging.getLogger("streamd")

MIN_BENCH_WINDOWS = 2
VERSIONED = ("torch", "transformers", "av", "numpy", "aiomqtt", "httpx", "mlx-vlm", "mlx")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamd`` console script and ``python -m streamd``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    handler = {
        "run": cmd_run,
        "check-config": cmd_check_config,
        "analyze": cmd_analyze,
        "bench": cmd_bench,
        "version": cmd_version,
    }[args.command]
    try:
        code = handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `streamd version | head -1`: the reader left. Python's documented recipe: point
        # stdout at devnull so the flush at exit does not raise again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.FAILURE
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        return ExitCode.INTERRUPTED
    return code


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="streamd", description="Live video analysis with SmolVLM2: events over MQTT."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon on every stream of a config file")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config")
    _logging_args(run)

    check = sub.add_parser("check-config", help="validate a config file and summarise it")
    check.add_argument("file", metavar="FILE")

    analyze = sub.add_parser("analyze", help="rank the highlights of a video file")
    _analyze_args(analyze)
    _logging_args(analyze, default_level="warning")

    bench = sub.add_parser("bench", help="measure this machine with the configured model")
    _bench_args(bench)
    _logging_args(bench, default_level="warning")

    sub.add_parser("version", help="print versions")
    return parser


def _logging_args(parser: argparse.ArgumentParser, default_level: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        default=default_level,
        choices=LOG_LEVELS,
        help=f"default {default_level}",
    )
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS)


def _bench_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("-c", "--config", default=None, metavar="FILE", help="model and defaults: from here")
    _model_args(parser)
    add("--window-s", type=float, default=None, help="default: the config's, else 8")
    add("--stride-s", type=float, default=None, help="default: the config's, else 4")
    add("--sample-fps", type=float, default=None, help="default: the config's, else 1")
    add("--windows", type=int, default=6, help="windows measured (default 6)")
    add("--json", action="store_true", help="print the numbers as JSON")


def _analyze_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("video", metavar="VIDEO", help="video file")
    add("--profile", default="highlights", choices=PROFILES)
    add("--system", default=None, metavar="TEXT", help="system prompt (overrides the profile's)")
    add("--prompt", default=None, metavar="TEXT", help="question (overrides the profile's)")
    _model_args(parser)
    _analysis_args(parser)


def _model_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--backend",
        default="auto",
        choices=BACKEND_NAMES,
        help="default: mlx on Apple Silicon with mlx-vlm installed, else transformers",
    )
    add("--model", default=DEFAULT_MODEL_ID, metavar="ID_OR_DIR", help="hub id or local directory")
    add("--max-new-tokens", type=int, default=64, help="longest description (default 64)")
    # Each backend's own flags, from the registry: a new backend adds its flags there.
    for option, backends in cli_options().values():
        add(
            option.flag,
            dest=option.key,
            default=None,
            metavar=option.metavar,
            choices=option.choices,
            help=f"{option.help} [{', '.join(backends)}]",
        )


def _analysis_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--window-s", type=float, default=30.0, help="window length (default 30)")
    add("--overlap-s", type=float, default=5.0, help="overlap of consecutive windows (default 5)")
    add("--sample-fps", type=float, default=1.0, help="frames per second analysed (default 1)")
    add("--min-significance", type=int, default=6, help="lowest score kept (default 6)")
    add("--max-highlights", type=int, default=10, help="most highlights listed (default 10)")
    add(
        "--describe-all",
        action="store_true",
        help="describe every window, not only those at or above --min-significance",
    )
    add("--json", dest="json_path", default=None, metavar="PATH", help="also write the result here")
    add("--clip-out", default=None, metavar="PATH", help="write an MP4 reel of the highlights")
    add("--report", default=None, metavar="PATH.html", help="write a self-contained HTML report")


# --- commands -------------------------------------------------------------------------------


def _load(path: str) -> Config | None:
    """The config at ``path``, or None once its problems are on stderr, one line each."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _setup_logging(args: argparse.Namespace) -> None:
    setup_logging(args.log_level, cast(LogFormat, args.log_format))


def cmd_check_config(args: argparse.Namespace) -> int:
    """``streamd check-config FILE``."""
    config = _load(args.file)
    if config is None:
        return ExitCode.CONFIG
    print(f"{args.file}: valid")
    print(summarize(config))
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    """``streamd run -c FILE``: the daemon."""
    _setup_logging(args)
    config = _load(args.config)
    if config is None:
        return ExitCode.CONFIG
    from streamd import daemon  # noqa: PLC0415 - keep `streamd version` light

    return daemon.run(config)


def cmd_analyze(args: argparse.Namespace) -> int:
    """``streamd analyze VIDEO``: ranked highlights as JSON on stdout (and ``--json``)."""
    _setup_logging(args)
    built = _analyze_configs(args)
    if isinstance(built, list):
        return _usage(built)
    stream, model = built
    started = datetime.now().astimezone()
    from streamd import highlights, report  # noqa: PLC0415 - heavy imports only for this command

    options = highlights.AnalyzeOptions(args.video, model, stream, args.max_highlights)
    analysis = highlights.Analysis(model_id=model.id)
    try:
        info = highlights.probe(args.video)
        interrupted = asyncio.run(_analyze_until_interrupted(options, info, analysis))
    except SourceError as exc:
        return _usage([str(exc)])
    except ModelError as exc:
        print(f"streamd analyze: {_analyze_knobs(str(exc))}", file=sys.stderr)
        return ExitCode.STARTUP
    chosen = highlights.merge_highlights(
        analysis.spans, stream.min_significance, options.max_highlights
    )
    result = highlights.result_json(options, info.duration_s, analysis, chosen)
    page = functools.partial(report.report_for, options, info.duration_s, analysis, chosen, started)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    code = _write_outputs(args, text, interrupted, page)
    if code != ExitCode.OK:
        return code
    if interrupted:
        print("streamd analyze: interrupted; the result holds what was scored", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return _write_reel(args, [(h.start_s, h.end_s) for h in chosen])


def _usage(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"streamd analyze: {problem}", file=sys.stderr)
    return ExitCode.USAGE


# --- analyze: arguments -> configs ----------------------------------------------------------

ANALYZE_STREAM = "analyze"
_ANALYZE_FLAGS = {
    "url": "VIDEO",
    "sample_fps": "--sample-fps",
    "window_s": "--window-s",
    "stride_s": "--overlap-s",
    "profile": "--profile",
    "system_prompt": "--system",
    "prompt": "--prompt",
    "min_significance": "--min-significance",
    "id": "--model",
    "backend": "--backend",
    "max_new_tokens": "--max-new-tokens",
    **{option.key: option.flag for option, _backends in cli_options().values()},
}
"""Config field -> the ``analyze`` flag that sets it (stride_s is --window-s - --overlap-s)."""
_MODEL_KEYS = ("id", "backend", "max_new_tokens", *(o.key for o, _ in cli_options().values()))
_FIELD_RE = re.compile(
    r"\bmodel\.(" + "|".join(_MODEL_KEYS) + r")\b"
    r"|\b(" + "|".join(name for name in _ANALYZE_FLAGS if "_" in name) + r")\b"
)
"""``model.id`` and friends, and the config keys no English word spells (``window_s``...)."""


def _analyze_knobs(message: str) -> str:
    """A message written in config keys (``set model.id``), in ``analyze``'s flags (``--model``).

    Messages from the config and the backends name the config file's keys, the daemon's knobs;
    each front end names its own, and this is ``analyze``'s table.
    """
    return _FIELD_RE.sub(lambda m: _ANALYZE_FLAGS[m[1] or m[2]], message)


def _analyze_configs(args: argparse.Namespace) -> tuple[StreamConfig, ModelSection] | list[str]:
    """The stream and model configs of the arguments, or one line per problem with them.

    The config models' own rules apply, so ``analyze`` accepts exactly what a config file
    accepts (finite numbers, frames per window...). Only the overlap and the number of
    highlights are ``analyze``'s own. The output paths are checked last (they need a sane
    command line first), all before any analysis.
    """
    problems: list[str] = []
    window_ok = math.isfinite(args.window_s) and args.window_s > 0
    overlap = args.overlap_s
    if window_ok and not 0 <= overlap < args.window_s:
        problems.append(f"--overlap-s: must be >= 0 and below --window-s ({args.window_s:g})")
        overlap = 0.0
    if args.max_highlights < 1:
        problems.append("--max-highlights: must be >= 1")
    stream = model = None
    try:
        stream = StreamConfig(
            name=ANALYZE_STREAM,
            url=args.video,
            live=False,
            sample_fps=args.sample_fps,
            window_s=args.window_s,
            stride_s=args.window_s - overlap,
            profile=args.profile,
            system_prompt=args.system,
            prompt=args.prompt,
            min_significance=args.min_significance,
            describe_below_min=args.describe_all,
        )
    except ValidationError as exc:
        problems += _flag_problems(exc)
    try:
        built = _model_config(args)
    except ValidationError as exc:
        problems += _flag_problems(exc)
    else:
        if isinstance(built, list):
            problems += built
        else:
            model = built
    if problems or stream is None or model is None:
        return problems
    return _output_problems(args) or (stream, model)


def _model_config(args: argparse.Namespace) -> ModelSection | list[str]:
    """The ``model:`` section the flags describe, validated by its own model.

    Each backend takes the flags the registry lists for it; another backend's flag is a
    mistake worth saying (``--device`` means nothing to a remote server).
    """
    spec = spec_of(args.backend)
    section: dict[str, object] = {
        "backend": args.backend,
        "id": args.model,
        "max_new_tokens": args.max_new_tokens,
    }
    problems = []
    for option, backends in cli_options().values():
        value = getattr(args, option.key)
        if value is None:
            continue
        if option not in spec.options:
            problems.append(
                f"{option.flag}: does not apply to --backend {args.backend}"
                f" (only to {', '.join(backends)})"
            )
        section[option.key] = value
    if problems:
        return problems
    return _MODEL_SECTION.validate_python(section)


_MODEL_SECTION: TypeAdapter[ModelSection] = TypeAdapter(ModelSection)


def _flag_problems(exc: ValidationError) -> list[str]:
    """Pydantic's errors as ``--flag: what is wrong`` lines (model-wide ones name theirs)."""
    lines = []
    errors = [line.partition(": ")[::2] for line in format_validation_error(exc, "")]
    window_bad = any(field == "window_s" for field, _ in errors)
    for field, message in errors:
        problem = _analyze_knobs(message)
        if field == "stride_s" and window_bad:
            continue  # the stride is --window-s minus --overlap-s: said once, for --window-s
        if field == "stride_s":
            lines.append(f"--overlap-s: --window-s minus --overlap-s {problem}")
        elif field in _ANALYZE_FLAGS:
            lines.append(f"{_ANALYZE_FLAGS[field]}: {problem}")
        else:  # "<root>": a rule over several fields, whose message names them
            lines.append(problem)
    return lines


# --- analyze: output paths ------------------------------------------------------------------


def _output_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with ``--json``, ``--clip-out`` and ``--report``, before any analysis."""
    flags = (("--json", args.json_path), ("--clip-out", args.clip_out), ("--report", args.report))
    outputs = [
        (flag, path)
        for flag, path in flags
        if path is not None and not (flag == "--json" and path == "-")
    ]
    problems = []
    for flag, path in outputs:
        problem = _output_problem(args.video, path)
        if problem is None and flag == "--clip-out":
            from streamd.reel import check_reel_path  # noqa: PLC0415 - imports av

            problem = check_reel_path(path)
        if problem is not None:
            problems.append(f"{flag}: {problem}")
    if problems:
        return problems
    for i, (flag, path) in enumerate(outputs):
        earlier = next((f for f, p in outputs[:i] if _same_file(p, path)), None)
        if earlier is not None:
            problems.append(f"{flag}: {path}: is the {earlier} file too")
    return problems


def _output_problem(video: str, path: str) -> str | None:
    target = Path(path)
    if _same_file(video, path):
        return f"{path}: is the input video; refusing to overwrite it"
    if target.is_dir():
        return f"{path}: is a directory"
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        return f"{path}: directory {parent} does not exist"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{path}: not writable"
    if not target.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: directory {parent} is not writable"
    return None


def _same_file(a: str, b: str) -> bool:
    """The same file: one path, or a symlink or hard link to it."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


# --- analyze: running and writing -------------------------------------------------------------


async def _analyze_until_interrupted(
    options: highlights.AnalyzeOptions, info: highlights.VideoInfo, analysis: highlights.Analysis
) -> bool:
    """Run the analysis until it ends or SIGINT/SIGTERM arrive; True if they did.

    A signal cancels the analysis task, which stops its decode thread and model, and leaves
    ``analysis`` with what was scored: the caller still writes that (``"complete": false``).
    """
    from streamd import highlights  # noqa: PLC0415 - heavy imports only for this command

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(highlights.analyze(options, info, analysis), name="streamd.analyze")
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:  # a second Ctrl-C must not cut the clean-up short
            interrupted = True
            task.cancel()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, interrupt)
    try:
        await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
    except StreamdError as exc:  # the model or source gave up while being stopped
        if not interrupted:
            raise
        logger.debug("while interrupted: %s", exc)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    return interrupted


def _write_outputs(
    args: argparse.Namespace, text: str, interrupted: bool, page: Callable[[], str]
) -> int:
    """The result to ``--json`` and ``--report`` (first: stdout may be a closed pipe), then stdout.

    ``page`` builds the report; it cuts thumbnails, so it runs only for ``--report``.
    """
    if args.json_path and args.json_path != "-":
        try:
            Path(args.json_path).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"streamd analyze: --json: {args.json_path}: {exc.strerror}", file=sys.stderr)
            print(text)
            return ExitCode.FAILURE
    if args.report:
        try:
            Path(args.report).write_text(page(), encoding="utf-8")
        except OSError as exc:
            print(f"streamd analyze: --report: {args.report}: {exc.strerror}", file=sys.stderr)
            print(text)
            return ExitCode.FAILURE
    print(text)
    if interrupted and args.clip_out:
        logger.warning("interrupted: no reel written to %s", args.clip_out)
    return ExitCode.OK


def _write_reel(args: argparse.Namespace, spans: list[tuple[float, float]]) -> int:
    if not args.clip_out:
        return ExitCode.OK
    if not spans:
        print("streamd analyze: no highlights, no reel written", file=sys.stderr)
        return ExitCode.OK
    from streamd.reel import write_reel  # noqa: PLC0415 - imports av

    try:
        write_reel(args.video, spans, args.clip_out)
    except (OSError, StreamdError) as exc:
        print(f"streamd analyze: --clip-out: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK


_BENCH_FLAGS = {"window_s": "--window-s", "stride_s": "--stride-s", "sample_fps": "--sample-fps"}
_BENCH_RE = re.compile(r"\b(" + "|".join(_BENCH_FLAGS) + r")\b")


def _bench_knobs(line: str) -> str:
    """A window-shape problem (``<root>: stride_s (3) must not...``) in ``bench``'s flags."""
    line = line.removeprefix("<root>: ")
    return _BENCH_RE.sub(lambda m: _BENCH_FLAGS[m[1]], line)


def cmd_bench(args: argparse.Namespace) -> int:
    """``streamd bench``: vision, prefill, tokens/s and the streams this machine holds."""
    _setup_logging(args)
    if args.config is not None:
        config = _load(args.config)
        if config is None:
            return ExitCode.CONFIG
        model: ModelSection | list[str] = config.model
        base = config.defaults
    else:
        try:
            model = _model_config(args)
        except ValidationError as exc:
            model = _flag_problems(exc)
        base = StreamDefaults()
    overrides = {
        key: value
        for key in ("window_s", "stride_s", "sample_fps")
        if (value := getattr(args, key)) is not None
    }
    problems = model if isinstance(model, list) else []
    if args.windows < MIN_BENCH_WINDOWS:
        problems.append(
            f"--windows: must be at least {MIN_BENCH_WINDOWS} (the first is not steady state)"
        )
    try:
        stream = StreamDefaults.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        problems += [_bench_knobs(line) for line in format_validation_error(exc, "")]
    if problems or isinstance(model, list):
        for problem in problems:
            print(f"streamd bench: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    from streamd.bench import run_bench  # noqa: PLC0415 - heavy imports only for this command

    try:
        result = run_bench(model, stream, args.windows)
    except ModelError as exc:
        print(f"streamd bench: {_analyze_knobs(str(exc))}", file=sys.stderr)
        return ExitCode.STARTUP
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    return ExitCode.OK


def cmd_version(args: argparse.Namespace) -> int:
    """``streamd version``: ours and the libraries' versions (read from metadata, not imported)."""
    print(f"streamd {__version__}")
    print(f"python {platform.python_version()} ({sys.platform}, {platform.machine()})")
    for name in VERSIONED:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        print(f"{name} {version}")
    return ExitCode.OK
