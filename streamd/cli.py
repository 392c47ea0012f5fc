"""Command line: ``run``, ``check-config``, ``analyze``, ``version``; owns the exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Literal, cast

from pydantic import ValidationError

from streamd import __version__
from streamd.config import (
    DEFAULT_MODEL_ID,
    PROFILES,
    ModelConfig,
    Profile,
    format_validation_error,
    load_config,
    summarize,
)
from streamd.errors import ConfigError, ExitCode, ModelError, SourceError, StreamdError
from streamd.log import setup_logging

logger = logging.getLogger("streamd")

MAX_SIGNIFICANCE = 10
VERSIONED = ("torch", "transformers", "av", "numpy", "aiomqtt", "mlx-vlm", "mlx")


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
        "version": cmd_version,
    }[args.command]
    return handler(args)


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

    sub.add_parser("version", help="print versions")
    return parser


def _logging_args(parser: argparse.ArgumentParser, default_level: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        default=default_level,
        choices=("debug", "info", "warning", "error"),
        help=f"default {default_level}",
    )
    parser.add_argument("--log-format", default="text", choices=("text", "json"))


def _analyze_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("video", metavar="VIDEO", help="video file")
    add("--profile", default="highlights", choices=PROFILES)
    add("--system", default=None, metavar="TEXT", help="system prompt (overrides the profile's)")
    add("--prompt", default=None, metavar="TEXT", help="question (overrides the profile's)")
    add(
        "--backend",
        default="auto",
        choices=("auto", "transformers", "mlx", "motion"),
        help="default: mlx on Apple Silicon with mlx-vlm installed, else transformers",
    )
    add("--model", default=DEFAULT_MODEL_ID, metavar="ID_OR_DIR", help="hub id or local directory")
    add("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu")
    add("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    add("--max-new-tokens", type=int, default=64, help="longest description (default 64)")
    add("--window-s", type=float, default=30.0, help="window length (default 30)")
    add("--overlap-s", type=float, default=5.0, help="overlap of consecutive windows (default 5)")
    add("--sample-fps", type=float, default=1.0, help="frames per second analysed (default 1)")
    add("--min-significance", type=int, default=6, help="lowest score kept (default 6)")
    add("--max-highlights", type=int, default=10, help="most highlights listed (default 10)")
    add("--json", dest="json_path", default=None, metavar="PATH", help="also write the result here")
    add("--clip-out", default=None, metavar="PATH", help="write an MP4 reel of the highlights")


# --- commands -------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    """``streamd check-config FILE``."""
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    print(f"{args.file}: valid")
    print(summarize(config))
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    """``streamd run -c FILE``: the daemon."""
    setup_logging(args.log_level, cast(Literal["text", "json"], args.log_format))
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    from streamd import daemon  # noqa: PLC0415 - keep `streamd version` light

    return daemon.run(config)


def cmd_analyze(args: argparse.Namespace) -> int:
    """``streamd analyze VIDEO``: ranked highlights as JSON on stdout."""
    setup_logging(args.log_level, cast(Literal["text", "json"], args.log_format))
    problem = _check_analyze_args(args)
    if problem:
        print(f"streamd analyze: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    from streamd import highlights  # noqa: PLC0415 - heavy imports only for this command

    try:
        model = ModelConfig(
            backend=args.backend,
            id=args.model,
            device=args.device,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
        )
    except ValidationError as exc:
        field, _, problem = format_validation_error(exc, "")[0].partition(": ")
        option = "--model" if field == "id" else "--" + field.replace("_", "-")
        print(f"streamd analyze: {option}: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    options = highlights.AnalyzeOptions(
        video=args.video,
        model=model,
        profile=cast(Profile, args.profile),
        system_prompt=args.system,
        prompt=args.prompt,
        window_s=args.window_s,
        overlap_s=args.overlap_s,
        sample_fps=args.sample_fps,
        min_significance=args.min_significance,
        max_highlights=args.max_highlights,
    )
    try:
        info = highlights.probe(args.video)
        model_id, spans = asyncio.run(highlights.analyze(options, info))
    except SourceError as exc:
        print(f"streamd analyze: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except ModelError as exc:
        print(f"streamd analyze: {exc}", file=sys.stderr)
        return ExitCode.STARTUP
    chosen = highlights.merge_highlights(spans, args.min_significance, args.max_highlights)
    result = highlights.result_json(options, info.duration_s, model_id, len(spans), chosen)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    return _write_outputs(args, text, [(h.start_s, h.end_s) for h in chosen])


def _check_analyze_args(args: argparse.Namespace) -> str | None:
    checks = (
        (args.window_s > 0, "--window-s must be > 0"),
        (0 <= args.overlap_s < args.window_s, "--overlap-s must be >= 0 and below --window-s"),
        (args.sample_fps > 0, "--sample-fps must be > 0"),
        (args.window_s * args.sample_fps >= 1, "--window-s x --sample-fps must be >= 1 frame"),
        (1 <= args.min_significance <= MAX_SIGNIFICANCE, "--min-significance must be 1-10"),
        (args.max_highlights >= 1, "--max-highlights must be >= 1"),
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
    )
    return next((problem for ok, problem in checks if not ok), None)


def _write_outputs(args: argparse.Namespace, text: str, spans: list[tuple[float, float]]) -> int:
    try:
        if args.json_path:
            Path(args.json_path).write_text(text + "\n", encoding="utf-8")
        if args.clip_out:
            from streamd.reel import write_reel  # noqa: PLC0415

            if spans:
                write_reel(args.video, spans, args.clip_out)
            else:
                print("streamd analyze: no highlights, no reel written", file=sys.stderr)
    except (OSError, StreamdError) as exc:
        print(f"streamd analyze: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
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
