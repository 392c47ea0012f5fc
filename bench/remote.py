"""Windows/s of the openai backend with requests kept in flight vs one request at a time.

Starts mlx-vlm's OpenAI-compatible server (``.venv-mlx``, see .ci/run) on a SmolVLM2 checkpoint
(the tiny random one by default: nothing is downloaded), then scores the same windows of
several streams through ``ModelRunner`` twice per round, interleaved so that load on the
machine hits both alike:

(a) ``max_in_flight`` 1: one request at a time (what the runner did before issue 8);
(b) ``max_in_flight`` N: N requests open at once, each answered as soon as it returns.

On one CPU box the server and the client share the cores, so the ratio is a floor: a GPU
server batches the requests in flight, which is where (b) pays.

Then the cost of describing only what needs it (issue 8's two-step), with the model biased to
answer "7" so every window has a readable score and every answer runs to ``--tokens``:

(c) one request a window, described (``describe_below`` None: ``analyze --describe-all``);
(d) quiet windows: the score alone, one request of a few tokens;
(e) windows at the threshold: the score, then a second, whole request for the description;
(f) as (e), the second request continuing the first answer (``continue_final_message``).

    python bench/remote.py [--streams 8] [--frames 8] [--in-flight 4] [--rounds 3]
                           [--tokens 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamd.domain import Frame, ScoreRequest, Window
from streamd.metrics import Metrics
from streamd.scoring.openai_config import OpenAIModelConfig
from streamd.scoring.openai_impl import OpenAIBackend
from streamd.scoring.prompt import PROFILES
from streamd.scoring.runner import ModelRunner
from tests.frames import bars
from tests.openai_server import MlxVlmServer, mlx_server_unavailable_reason

SIZE = 512
PROMPT = PROFILES["surveillance"]


def windows(
    streams: int, frames: int, round_no: int, describe_below: int | None = None
) -> list[ScoreRequest]:
    """One window per stream, ``frames`` frames each; new frame indices every round."""
    requests = []
    for s in range(streams):
        name = f"cam{s}"
        base = round_no * 1000 + s * frames
        shot = tuple(
            Frame(name, base + i, float(i), 1e9 + i, bars(base + i, SIZE)) for i in range(frames)
        )
        requests.append(
            ScoreRequest(
                Window(name, round_no + 1, 0.0, float(frames), shot, 1e9), PROMPT, describe_below
            )
        )
    return requests


async def timed(
    server: MlxVlmServer, in_flight: int, requests: list[ScoreRequest], **settings: object
) -> float:
    config = OpenAIModelConfig.model_validate(
        {
            "id": server.model_id,
            "base_url": server.base_url,
            "max_in_flight": in_flight,
            "max_new_tokens": 16,
            **settings,
        }
    )
    backend = OpenAIBackend(config, environ={})
    runner = ModelRunner(backend, Metrics(CollectorRegistry()), config.stall_timeout_s)
    await runner.start()
    scheduler = asyncio.create_task(runner.run())
    try:
        started = time.perf_counter()
        await asyncio.gather(*(runner.score(r) for r in requests))
        return time.perf_counter() - started
    finally:
        scheduler.cancel()
        await asyncio.gather(scheduler, return_exceptions=True)
        await runner.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="description tokens, (c)-(f)")
    parser.add_argument("--model", type=Path, default=None, help="default: the tiny SmolVLM2")
    args = parser.parse_args()
    reason = mlx_server_unavailable_reason()
    if reason:
        raise SystemExit(f"mlx-vlm server unavailable: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.tiny_smolvlm import build_tiny_smolvlm  # noqa: PLC0415 - needs torch

            model = build_tiny_smolvlm(Path(tmp) / "tiny")
        with MlxVlmServer(model.resolve(), Path(tmp) / "server.log") as server:
            await timed(server, 1, windows(1, 2, 99))  # warm the server up
            one, many = [], []
            for round_no in range(args.rounds):
                one.append(await timed(server, 1, windows(args.streams, args.frames, 2 * round_no)))
                many.append(
                    await timed(
                        server, args.in_flight, windows(args.streams, args.frames, 2 * round_no + 1)
                    )
                )
            steps = await describe_costs(server, model, args)
    n = args.streams
    a, b = statistics.median(one), statistics.median(many)
    print(f"{n} windows of {args.frames} frames, median of {args.rounds} rounds")
    print(f"  max_in_flight 1:  {a:.2f}s  ({n / a:.2f} windows/s)")
    print(f"  max_in_flight {args.in_flight}:  {b:.2f}s  ({n / b:.2f} windows/s)")
    print(f"  ratio: {a / b:.2f}x")
    print(f"describing only what needs it, max_in_flight {args.in_flight}, {args.tokens} tokens")
    base = statistics.median(steps[STEPS[0][0]])
    for label, _below, _continued in STEPS:
        t = statistics.median(steps[label])
        print(f"  {label:<40} {t:.2f}s  ({n / t:.2f} windows/s, {base / t:.2f}x)")


STEPS = (
    ("(c) one request, described", None, False),
    ("(d) quiet: score only", 8, False),
    ("(e) at threshold: score + description", 7, False),
    ("(f) as (e), continued", 7, True),
)


async def describe_costs(
    server: MlxVlmServer, model: Path, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Seconds for the same windows in each of (c)-(f), interleaved round by round."""
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    bias = {"logit_bias": {str(vocab["7"]): 100}}
    times: dict[str, list[float]] = {label: [] for label, _, _ in STEPS}
    for round_no in range(args.rounds):
        for k, (label, below, continued) in enumerate(STEPS):
            requests = windows(args.streams, args.frames, 100 + 10 * round_no + k, below)
            times[label].append(
                await timed(
                    server,
                    args.in_flight,
                    requests,
                    extra_body=bias,
                    max_new_tokens=args.tokens,
                    continue_final_message=continued,
                )
            )
    return times


if __name__ == "__main__":
    asyncio.run(main())
