"""torch CPU threads: one streamd alone, oversubscribed, and two instances sharing the cores.

Each measurement is a child process (thread settings only take before torch starts) that loads
the transformers backend on a SmolVLM2 checkpoint (default: 256M dimensions with random
weights, built offline by ``bench/analysis.py`` if missing), encodes ``--frames`` new frames
(vision seconds per frame) and scores one window of them with a description (prefill, then
decode tokens/s). Configurations, in one run:

(a) one process, ``model.threads`` = the usable cores (streamd's default): the baseline;
(b) one process, twice as many threads as cores;
(c) two processes at once, each with all the cores' threads (two instances, defaults);
(d) two processes at once, each with half the cores' threads (``model.threads`` split);
(e) as (c), each pinned to its own half of the cores (``CPUAffinity=``; needs 2+ cores).

For two processes the table gives each one's numbers and their combined frame throughput
against (a). Run it alone on the machine.

    python bench/threads.py [--model DIR] [--frames 3] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamd.hardware import this_cpu

DEFAULT_MODEL = Path(tempfile.gettempdir()) / "real256"


def child(model: Path, threads: int, frames: int, tokens: int, start_at: float) -> dict[str, float]:
    """Load, wait for ``start_at`` (epoch s), encode ``frames`` frames, score a window of them."""
    import numpy as np  # noqa: PLC0415 - only in the child

    from streamd.config import ModelConfig  # noqa: PLC0415
    from streamd.domain import Frame, ScoreRequest, Window  # noqa: PLC0415
    from streamd.scoring.prompt import PROFILES  # noqa: PLC0415
    from streamd.scoring.transformers_impl import TransformersBackend  # noqa: PLC0415

    config = ModelConfig(
        backend="transformers",
        id=str(model),
        device="cpu",
        dtype="float32",
        threads=threads,
        max_new_tokens=tokens,
    )
    backend = TransformersBackend(config)
    backend.load()
    backend.warm_up()
    width, height = backend.input_size
    rng = np.random.default_rng(os.getpid())
    shots = tuple(
        Frame("bench", i, float(i), 1e9 + i, rng.integers(0, 256, (height, width, 3), np.uint8))
        for i in range(frames)
    )
    time.sleep(max(0.0, start_at - time.time()))  # two children measure at the same time
    started = time.perf_counter()
    backend.encode_ahead(shots)
    vision_s = (time.perf_counter() - started) / frames
    window = Window("bench", 1, 0.0, float(frames), shots, 1e9)
    (score,) = backend.score([ScoreRequest(window, PROFILES["surveillance"])])
    generated = max(1, score.timings.completion_tokens)
    return {
        "threads": backend.threads,
        "vision_s_per_frame": vision_s,
        "prefill_s": score.timings.prefill_s,
        "tokens_per_s": generated / max(score.timings.generate_s, 1e-9),
    }


LOAD_MARGIN_S = float(os.environ.get("BENCH_LOAD_MARGIN_S", "30"))
"""Children start measuring this long after being spawned: both have loaded by then."""


def spawn(
    args: argparse.Namespace, threads: int, start_at: float, cpus: set[int] | None = None
) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "--child", str(threads), "--model", str(args.model)]
    command += ["--frames", str(args.frames), "--tokens", str(args.tokens)]
    command += ["--start-at", str(start_at)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("OMP_NUM_THREADS", None)

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pin)  # noqa: PLW1509 - our own script


def collect(processes: list[subprocess.Popen[str]]) -> list[dict[str, float]]:
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise SystemExit(f"a child failed (exit {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def cpu_flags() -> str:
    return this_cpu().summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, args.frames, args.tokens, args.start_at)))
        return
    if not (args.model / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from analysis import build_checkpoint  # noqa: PLC0415 - bench/analysis.py

        build_checkpoint(args.model)
    cpus = sorted(os.sched_getaffinity(0))
    cores = len(cpus)
    half = max(1, cores // 2)

    def run(*threads: int, pins: tuple[set[int], ...] = ()) -> list[dict[str, float]]:
        start_at = time.time() + (LOAD_MARGIN_S if len(threads) > 1 else 0.0)
        cpu_sets = pins or (None,) * len(threads)
        return collect(
            [spawn(args, n, start_at, c) for n, c in zip(threads, cpu_sets, strict=True)]
        )

    rows: list[tuple[str, list[dict[str, float]]]] = [
        ("(a) alone, threads = cores", run(cores)),
        ("(b) alone, threads = 2 x cores", run(2 * cores)),
        ("(c) two at once, cores each", run(cores, cores)),
        ("(d) two at once, half each", run(half, half)),
    ]
    if cores >= 2:
        pins = (set(cpus[:half]), set(cpus[half:]))
        rows.append(("(e) two at once, pinned halves", run(half, cores - half, pins=pins)))
    print(f"CPU: {cpu_flags()}; model {args.model}")
    base = rows[0][1][0]["vision_s_per_frame"]
    print(f"{'':34} {'threads':>7} {'vision s/frame':>14} {'prefill s':>9} {'tok/s':>6}")
    for label, results in rows:
        for i, r in enumerate(results):
            name = label if i == 0 else ""
            print(
                f"{name:34} {int(r['threads']):>7} {r['vision_s_per_frame']:>14.2f}"
                f" {r['prefill_s']:>9.2f} {r['tokens_per_s']:>6.1f}"
            )
        combined = sum(1 / r["vision_s_per_frame"] for r in results)
        print(f"{'':34} frames/s combined {combined:.2f} = {combined * base:.2f}x of (a)")


if __name__ == "__main__":
    main()
