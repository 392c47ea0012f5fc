"""Live capacity: how many cameras streamd holds in real time, with and without the motion gate.

Runs the real daemon in-process (decode threads, windower, runner, model; MQTT off) on N live
streams that each loop the same synthetic camera clip at 1x: mostly static footage with scripted
events (``bench/motion_gate.py``'s quiet scene: a person, a distant person, a slow walker, a
package, a brief pass, a car, a porch light, spread over the clip). For each N and each gate
setting it plays ``--seconds`` of video and reports, per stream, windows cut, analysed, skipped
by the gate and dropped as busy, the largest lag, and the cores the process used.

A stream is held when, after the first window, no window is dropped as busy and the lag stays
under one stride plus one window (the issue's definition). Side by side in one run:

(a) ``motion_gate: 0`` (every window to the model), descriptions ``auto``;
(b) the surveillance default gate (``auto``), descriptions ``auto``: frames near motion are
    encoded ahead of their windows (``motion.MotionWatch``);
(c) as (b) with nothing encoded ahead behind the gate, the baseline for (b) (patched here).

"ahead" is the share of the analysed windows' frames whose vision was done before the window
reached the model (``streamd_vision_cache_hits`` over hits and misses).

    python bench/live.py [--model DIR | --backend motion] [--streams 1,2,4] [--seconds 90]
                         [--sample-fps 1] [--gates 0,auto,auto-no-ahead]

The default model is 256M dimensions with random weights (built offline into /tmp/real256 by
``bench/analysis.py`` when missing); every number depends on the CPU: run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from motion_gate import Scene, cpu_name, write_clip

from streamd.config import Config
from streamd.daemon import Daemon
from streamd.domain import Frame
from streamd.pipeline import StreamPipeline
from streamd.sdnotify import SystemdNotifier

DEFAULT_MODEL = Path(tempfile.gettempdir()) / "real256"
NO_AHEAD = "auto-no-ahead"
GATES = ("0", "auto", NO_AHEAD)
CLIP_MINUTES = 6.0
"""Seven events in six minutes: about one a minute, each seen by a few windows."""


@dataclass(frozen=True, slots=True)
class Run:
    streams: int
    gate: str
    cut: float
    analysed: float
    gated: float
    busy: float
    max_lag_s: float
    cores_used: float
    ahead: float

    def held(self, window_s: float, stride_s: float) -> bool:
        # One busy drop per stream is allowed while the first windows meet a cold model.
        return self.busy <= self.streams and self.max_lag_s < window_s + stride_s


def config_of(args: argparse.Namespace, clip: Path, streams: int, gate: str) -> Config:
    model: dict[str, object] = {"backend": args.backend}
    if args.backend != "motion":
        model.update(id=str(args.model), device="cpu", dtype="float32", timeout_s=600)
    return Config.model_validate(
        {
            "model": model,
            "mqtt": {"enabled": False},
            "metrics": {"listen": ""},
            "defaults": {
                "profile": "surveillance",
                "motion_gate": gate.removesuffix("-no-ahead"),
                "sample_fps": args.sample_fps,
            },
            "streams": [
                {"name": f"cam{i}", "url": str(clip), "live": True} for i in range(streams)
            ],
        }
    )


async def play(config: Config, seconds: float, label: str) -> Run:
    registry = CollectorRegistry()
    daemon = Daemon(config, registry=registry, notifier=SystemdNotifier({}))
    ahead_of = StreamPipeline._ahead
    if label == NO_AHEAD:  # the behaviour before MotionWatch: nothing ahead behind a gate

        def ungated_only(self: StreamPipeline) -> Callable[[Frame], Sequence[Frame]] | None:
            return None if self.config.motion_gate > 0 else ahead_of(self)

        StreamPipeline._ahead = ungated_only  # type: ignore[method-assign]
    names = [stream.name for stream in config.streams]

    def total(metric: str, **labels: str) -> float:
        return sum(
            registry.get_sample_value(metric, {"stream": name, **labels}) or 0.0 for name in names
        )

    serving = asyncio.create_task(daemon.serve())
    while not (daemon.runner is not None and daemon.runner.ready):  # the model loads first
        if serving.done():
            raise SystemExit(f"the daemon exited with {serving.result()}")
        await asyncio.sleep(0.2)
    started, cpu_started = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    max_lag = 0.0
    while time.monotonic() - started < seconds:
        await asyncio.sleep(0.5)
        for name in names:
            lag = registry.get_sample_value("streamd_window_lag_seconds", {"stream": name})
            max_lag = max(max_lag, lag or 0.0)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    hits = registry.get_sample_value("streamd_vision_cache_hits_total") or 0.0
    misses = registry.get_sample_value("streamd_vision_cache_misses_total") or 0.0
    wall = time.monotonic() - started
    used = (cpu.ru_utime - cpu_started.ru_utime + cpu.ru_stime - cpu_started.ru_stime) / wall
    run = Run(
        streams=len(names),
        gate=f"{label} ({config.streams[0].motion_gate:g})",
        cut=total("streamd_windows_total"),
        analysed=total("streamd_windows_analyzed_total"),
        gated=total("streamd_windows_dropped_total", reason="motion_gate"),
        busy=total("streamd_windows_dropped_total", reason="busy"),
        max_lag_s=max_lag,
        cores_used=used,
        ahead=hits / max(1.0, hits + misses),
    )
    daemon.handle_exit(signal.SIGTERM, None)
    await serving
    StreamPipeline._ahead = ahead_of  # type: ignore[method-assign]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--backend", default="transformers", choices=("transformers", "motion"))
    parser.add_argument("--streams", default="1,2,4", help="stream counts to try")
    parser.add_argument("--seconds", type=float, default=90.0, help="video played per run")
    parser.add_argument("--sample-fps", type=float, default=1.0, help="the streams' sample_fps")
    parser.add_argument("--gates", default=",".join(GATES), help=f"of {', '.join(GATES)}")
    args = parser.parse_args()
    if args.backend == "transformers" and not (args.model / "config.json").exists():
        from analysis import build_checkpoint  # noqa: PLC0415 - bench/analysis.py

        build_checkpoint(args.model)
    counts = [int(n) for n in args.streams.split(",")]
    gates = args.gates.split(",")
    if unknown := [gate for gate in gates if gate not in GATES]:
        parser.error(f"--gates: unknown {', '.join(unknown)} (choose from {', '.join(GATES)})")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "camera.mp4"
        write_clip(clip, Scene("quiet", CLIP_MINUTES), 640, 360)
        runs = [
            asyncio.run(play(config_of(args, clip, n, gate), args.seconds, gate))
            for n in counts
            for gate in gates
        ]
    defaults = config_of(args, Path("x.mp4"), 1, "auto").streams[0]
    window_s, stride_s = defaults.window_s, defaults.stride_s
    print(f"CPU: {cpu_name()}; backend {args.backend}; {args.seconds:g} s of video a run")
    print(f"defaults: {window_s:g} s windows every {stride_s:g} s at {defaults.sample_fps:g} fps")
    header = "streams gate                      cut analysed gated busy max-lag-s cores ahead held"
    print(header)
    for run in runs:
        print(
            f"{run.streams:>7} {run.gate:<25} {run.cut:>4.0f} {run.analysed:>8.0f}"
            f" {run.gated:>5.0f} {run.busy:>4.0f} {run.max_lag_s:>9.1f} {run.cores_used:>5.2f}"
            f" {run.ahead:>5.0%} {'yes' if run.held(window_s, stride_s) else 'no'}"
        )
    for gate in gates:
        held = [r.streams for r in runs if r.gate.split()[0] == gate and r.held(window_s, stride_s)]
        print(f"most streams held, gate {gate}: {max(held, default=0)} (of {counts})")


if __name__ == "__main__":
    main()
