"""Per-token decode and prefill of SmolVLM2 at 256M dimensions: streamd's loops vs generate().

On a random-weight checkpoint with SmolVLM2-256M's real dimensions (built with
``bench.analysis.build_checkpoint`` if missing; compute does not depend on the weights) and a
real-size window (8 frames, 512x512, vision features computed once), it measures:

- per-token greedy decode of the same prompt: transformers' ``generate()``, streamd's loop as
  it was (``DynamicCache``, argmax to the host and new input tensors every token), the loop of
  ``TextDecoder.greedy`` on a ``DynamicCache`` and on reserved KV buffers, with the "all
  done?" sync every token or every 8, transformers' ``StaticCache`` (attends over every
  reserved column), and with ``--compile`` a ``torch.compile``d text model on it;
- ``--batch`` windows (different prompts, so left padding) decoded together vs one by one;
- prefill of a window with and without the exact text-prefix cache (a hit: the stream's
  earlier window left its system prompt and preamble).

Shared, noisy machines: every variant runs in a thread of its own, and a hook on ``lm_head``
lets one model step (one forward and the loop around it) run at a time, round-robin in a new
random order each round. Load that comes and goes hits every variant alike, step by step;
the table gives medians over all steps of ``--reps`` runs. Every variant decodes exactly
``--max-new-tokens`` tokens (no stop ids: random weights would stop anywhere) and must
produce the tokens ``generate()`` does.

    python bench/decode.py [--checkpoint /tmp/real256] [--max-new-tokens 32] [--reps 2]

About 5 minutes on 2 shared cores (about 3 more with --compile).
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from analysis import build_checkpoint  # bench/analysis.py, beside this script
from transformers import SmolVLMForConditionalGeneration, StaticCache

from streamd.config import ModelConfig
from streamd.domain import Frame, ScoreRequest, Window
from streamd.hardware import this_cpu
from streamd.scoring.prompt import PROFILES
from streamd.scoring.transformers_checkpoint import Checkpoint
from streamd.scoring.transformers_decode import RowPlan, TextDecoder
from streamd.scoring.transformers_impl import TransformersBackend
from streamd.scoring.transformers_kv import PrefixCache

FRAMES = 8
SIDE = 512
RESERVE = 64
PREFILLS = 3
"""Prefills per race of each prefill variant (decode variants give one step per token)."""
Tokens = list[list[int]]
Variant = Callable[[], Tokens]


@dataclass
class Turn:
    """One variant's thread and the two semaphores that hand the model back and forth."""

    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    arrived: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    finished: bool = False
    tokens: Tokens = field(default_factory=list)
    error: BaseException | None = None

    def arrive(self) -> None:
        """Called in the variant's thread after each model step: wait for the next turn."""
        self.arrived.release()
        self.go.acquire()


class Conductor:
    """Runs variants in lockstep: one model step of one variant at a time, timed.

    Args:
        lm_head: Every forward of the model ends here (prefill and each decoded token).
    """

    def __init__(self, lm_head: torch.nn.Module) -> None:
        self._turns: dict[int, Turn] = {}
        self.tokens: dict[str, Tokens] = {}
        """The last race's tokens, by variant."""
        lm_head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        turn = self._turns.get(threading.get_ident())
        if turn is not None:
            turn.arrive()

    def race(self, variants: dict[str, Variant], rng: random.Random) -> dict[str, list[float]]:
        """Each variant's seconds per model step (the first is its prefill); checks tokens."""
        turns = {name: Turn() for name in variants}
        threads = [
            threading.Thread(target=self._run, args=(turns[name], variant), daemon=True)
            for name, variant in variants.items()
        ]
        for thread in threads:
            thread.start()
        steps: dict[str, list[float]] = {name: [] for name in variants}
        running = list(variants)
        while running:
            rng.shuffle(running)
            for name in list(running):
                turn = turns[name]
                started = time.perf_counter()
                turn.go.release()
                turn.arrived.acquire()
                if turn.finished:  # the tail after the last forward: not a step
                    running.remove(name)
                else:
                    steps[name].append(time.perf_counter() - started)
        for thread in threads:
            thread.join()
        for name, turn in turns.items():
            if turn.error is not None:
                raise RuntimeError(f"{name} failed") from turn.error
            self.tokens[name] = turn.tokens
        return steps

    def _run(self, turn: Turn, variant: Variant) -> None:
        self._turns[threading.get_ident()] = turn
        turn.go.acquire()
        try:
            with torch.inference_mode():  # thread-local: each thread enters its own
                turn.tokens = variant()
        except BaseException as exc:  # re-raised by race, in the main thread
            turn.error = exc
        finally:
            turn.finished = True
            turn.arrived.release()


class Bench:
    """The loaded backend, the windows' prompts and features, and every variant."""

    def __init__(self, backend: TransformersBackend, max_new_tokens: int, batch: int) -> None:
        self.checkpoint: Checkpoint = backend.checkpoint
        self.tokens = max_new_tokens
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(FRAMES)]
        profiles = list(PROFILES.values())
        requests = []
        for row in range(batch):
            stream = f"s{row}"
            frames = tuple(Frame(stream, i, float(i), 0.0, image) for i, image in enumerate(images))
            window = Window(stream, 1, 0.0, float(FRAMES), frames, 0.0)
            requests.append(ScoreRequest(window, profiles[row % len(profiles)], None))
        started = time.perf_counter()
        with torch.inference_mode():
            features = backend.frame_encoder.encode([requests[0].window]).features[0]
        self.vision_s = time.perf_counter() - started
        self.features = [features] * batch  # the same frames: what they show costs nothing
        self.prompts = [self.checkpoint.encode(backend.prompt_text(r)) for r in requests]
        self.prefixes = PrefixCache()
        self.compiled: torch.nn.Module | None = None

    def generate(self) -> Tokens:
        """transformers' greedy generate() from the same embeddings, eos off."""
        model, ids = self.checkpoint.model, torch.tensor(self.prompts[:1])
        if not isinstance(model, SmolVLMForConditionalGeneration):
            raise TypeError(f"not a SmolVLM2: {type(model).__name__}")
        config = copy.deepcopy(model.generation_config)
        config.eos_token_id, config.pad_token_id = None, self.checkpoint.pad_token_id
        config.max_new_tokens, config.do_sample = self.tokens, False
        out = model.generate(
            inputs_embeds=self._embeds(ids),
            attention_mask=torch.ones_like(ids),
            generation_config=config,
        )
        tokens: Tokens = out[:, -self.tokens :].tolist()
        return tokens

    def streamd_before(self) -> Tokens:
        """The loop streamd had: DynamicCache, argmax to the host, new tensors every token."""
        state = TextDecoder(self.checkpoint, None).prefill(self.prompts[:1], self.features[:1])
        mask, positions, logits = state.attention_mask().clone(), state.next_position, state.logits
        tokens: list[int] = []
        while True:
            tokens.extend(logits.argmax(-1).tolist())
            if len(tokens) >= self.tokens:
                return [tokens]
            ids = torch.full((1, 1), self.checkpoint.pad_token_id, dtype=torch.long)
            valid = torch.zeros((1, 1), dtype=torch.long)
            ids[0, :] = torch.tensor([tokens[-1]])
            valid[0, :] = 1
            step_positions = (positions[:, None] + valid.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([mask, valid], dim=-1)
            output = self.checkpoint.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=step_positions,
                cache=state.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            fed = valid[:, -1].bool().unsqueeze(-1)
            logits = torch.where(fed, output.logits[:, -1].float(), logits)
            positions = positions + valid.sum(-1)

    def greedy(self, reserve: int | None, check_every: int = 1, rows: int = 1) -> Tokens:
        """``TextDecoder.greedy`` (what the backend runs) on ``rows`` windows at once."""
        decoder = TextDecoder(self.checkpoint, reserve, check_every=check_every)
        state = decoder.prefill(self.prompts[:rows], self.features[:rows])
        return decoder.greedy(state, [RowPlan(self.tokens, one_line=False)] * rows)

    def static_cache(self, compiled: bool = False) -> Tokens:
        """transformers' StaticCache: every step attends over all reserved columns."""
        model, prompt = self.checkpoint.model, self.prompts[0]
        width, columns = len(prompt), len(prompt) + self.tokens
        cache = StaticCache(config=model.config, max_cache_len=columns)
        mask = torch.zeros((1, columns), dtype=torch.long)
        mask[:, :width] = 1
        ids = torch.tensor([prompt])
        body = self.compiled if compiled and self.compiled is not None else model.model
        hidden = model.model(
            inputs_embeds=self._embeds(ids),
            attention_mask=mask[:, :width],
            position_ids=torch.arange(width)[None],
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        tokens = [model.lm_head(hidden[:, -1:]).float().argmax(-1)]
        for index in range(width, columns - 1):
            mask[:, index] = 1
            hidden = body(
                input_ids=tokens[-1],
                attention_mask=mask,
                position_ids=torch.tensor([[index]]),
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            tokens.append(model.lm_head(hidden[:, -1:]).float().argmax(-1))
        result: Tokens = torch.cat(tokens, dim=-1).tolist()
        return result

    def prefill_only(self, prefixes: PrefixCache | None, times: int = 1) -> Tokens:
        """``times`` prefills of the window (each one timed step) and its first token."""
        decoder = TextDecoder(self.checkpoint, RESERVE, prefixes)
        for _ in range(times):
            state = decoder.prefill(self.prompts[:1], self.features[:1])
        first: Tokens = state.logits.argmax(-1, keepdim=True).tolist()
        return first

    def prefix_tokens(self) -> int:
        return self.prompts[0].index(self.checkpoint.image_token_id)

    def _embeds(self, ids: torch.Tensor) -> torch.Tensor:
        embeds = self.checkpoint.model.get_input_embeddings()(ids)
        slots = (ids == self.checkpoint.image_token_id).unsqueeze(-1)
        result: torch.Tensor = embeds.masked_scatter(slots, self.features[0])
        return result


def cpu_summary() -> str:
    """CPU model, the SIMD/AMX flags that decide the kernels, torch threads."""
    return (
        f"cpu: {this_cpu().summary()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "real256")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4], help="rows decoded at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_summary())
    if not (args.checkpoint / "config.json").is_file():
        print(f"building {args.checkpoint}: {build_checkpoint(args.checkpoint):.1f} M parameters")
    config = ModelConfig(
        id=str(args.checkpoint), dtype=args.dtype, max_new_tokens=args.max_new_tokens
    )
    backend = TransformersBackend(config, max_batch=max(args.batch))
    backend.load()
    bench = Bench(backend, args.max_new_tokens, max(args.batch))
    print(
        f"{backend.describe()}; {FRAMES} frames of {SIDE}x{SIDE} ({bench.vision_s:.1f} s of"
        f" vision, once); prompt {len(bench.prompts[0])} tokens, text prefix"
        f" {bench.prefix_tokens()}; {args.max_new_tokens} new tokens; {args.reps} reps"
    )
    return run(bench, args)


GENERATE = "generate()"
BEFORE = "streamd before: DynamicCache, host argmax"
SHIPPED = "greedy loop, reserved KV (shipped)"
FULL = "prefill, full prompt"
HIT = "prefill, text prefix from the cache"


def run(bench: Bench, args: argparse.Namespace) -> int:
    """Race every variant ``args.reps`` times, print the table; 1 if any tokens differ."""
    variants: dict[str, Variant] = {
        GENERATE: bench.generate,
        BEFORE: bench.streamd_before,
        "greedy loop, DynamicCache": lambda: bench.greedy(None),
        SHIPPED: lambda: bench.greedy(RESERVE),
        "greedy loop, reserved KV, sync every 8": lambda: bench.greedy(RESERVE, check_every=8),
        "greedy loop, transformers StaticCache": bench.static_cache,
        FULL: lambda: bench.prefill_only(None, PREFILLS),
        HIT: lambda: bench.prefill_only(bench.prefixes, PREFILLS),
    }
    with torch.inference_mode():
        bench.prefill_only(bench.prefixes)  # the stream's earlier window: leaves the prefix
        bench.greedy(RESERVE)  # one-off costs hit no variant
        if args.compile:
            started = time.perf_counter()
            bench.compiled = torch.compile(bench.checkpoint.model.model, dynamic=False)  # type: ignore[assignment]
            bench.static_cache(compiled=True)
            print(f"torch.compile: {time.perf_counter() - started:.0f} s for one shape")
    batched = {f"batch of {rows}, shipped loop": rows for rows in args.batch}
    for name, rows in batched.items():
        variants[name] = functools.partial(bench.greedy, RESERVE, rows=rows)
    if args.compile:
        variants["greedy loop, StaticCache, torch.compile"] = lambda: bench.static_cache(True)
    conductor = Conductor(bench.checkpoint.model.lm_head)
    rng = random.Random(0)
    prefill: dict[str, list[float]] = {name: [] for name in variants}
    decode: dict[str, list[float]] = {name: [] for name in variants}
    mismatches = set()
    for rep in range(args.reps):
        steps = conductor.race(variants, rng)
        for name, seconds in steps.items():
            cut = PREFILLS if name in (FULL, HIT) else 1
            prefill[name].extend(seconds[:cut])
            decode[name].extend(seconds[cut:])
        reference = conductor.tokens[GENERATE]
        for name, tokens in conductor.tokens.items():
            if tokens[0] != reference[0][: len(tokens[0])]:
                mismatches.add(name)
        print(f"rep {rep + 1}/{args.reps}: {sum(map(len, steps.values()))} steps raced")
    print_table(prefill, decode, batched)
    print("tokens equal to generate()'s:", "all" if not mismatches else f"NOT {sorted(mismatches)}")
    return 1 if mismatches else 0


def print_table(
    prefill: dict[str, list[float]], decode: dict[str, list[float]], batched: dict[str, int]
) -> None:
    """Medians, with ratios against generate() and streamd's loop before, from the same run."""
    ms = {name: statistics.median(steps) for name, steps in decode.items() if steps}
    generate_s, before_s = ms[GENERATE], ms[BEFORE]
    head = f"{'decode, median per token':<44} {'ms':>7} {'tok/s':>7} {'vs gen':>7} {'vs before':>9}"
    print("\n" + head)
    for name, seconds in ms.items():
        rows = batched.get(name, 1)
        per_token = seconds / rows
        print(
            f"{name:<44} {per_token * 1e3:7.1f} {1 / per_token:7.1f}"
            f" {generate_s / per_token:6.2f}x {before_s / per_token:8.2f}x"
        )
    single = ms[SHIPPED]
    for name, rows in batched.items():
        print(
            f"  {rows} rows in one step: {ms[name] * 1e3:.1f} ms vs {rows} one-row steps"
            f" {rows * single * 1e3:.1f} ms: batched {rows * single / ms[name]:.2f}x"
        )
    full, hit = statistics.median(prefill[FULL]), statistics.median(prefill[HIT])
    print(f"\n{'prefill, median per window':<44} {'s':>7}")
    print(f"{'full prompt':<44} {full:7.3f}")
    print(f"{'text prefix from the cache':<44} {hit:7.3f}   {full / hit:.2f}x")
    print("(ratios > 1: faster than generate() / than streamd's loop before, in the same run)")


if __name__ == "__main__":
    raise SystemExit(main())
