"""Whole processes: ``streamd analyze`` vs the seed's per-segment ``generate()``, same windows.

Both runs start a fresh Python process on the same file and the same checkpoint (a SmolVLM2 of
the real 256M dimensions with random weights, built once by ``bench/analysis.py``'s helper;
nothing is downloaded), with the seed's segmentation (30 s windows, 5 s overlap, 1 fps). The
time is the process's wall time, model load included, as a user would see it.

(a) the seed's method: decode the file, per segment the image processor and one
    ``model.generate(pixel_values=...)``, every frame of every segment encoded from scratch
    (fed the same 512x512 pixels as streamd, so both encode the same patches);
(b) ``streamd analyze`` as shipped: frames encoded once (the vision cache), the score read
    from the digit logits, only windows at or above ``--min-significance`` described;
(c) ``streamd analyze --describe-all``: every window described (the worst case for (b));
(d) ``streamd analyze --vision-quantize int8``: (b) with the opt-in int8 vision encoder (CPU,
    float32 only; ``--ways abd``).

Rounds run a, b, c in turn, so load on the machine hits each alike. Run it alone.

    python bench/offline.py [--clip-s 80] [--rounds 1] [--dtype auto] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling benches, as live.py does


def seed_run(video: Path, checkpoint: Path, args: argparse.Namespace) -> int:
    """The seed's per-segment method, in this process (``--seed``)."""
    import av  # noqa: PLC0415 - the child process only
    import torch  # noqa: PLC0415
    from analysis import IMAGE_SIZE, PROMPT  # noqa: PLC0415
    from transformers import AutoImageProcessor, SmolVLMForConditionalGeneration  # noqa: PLC0415

    from streamd.config import ModelConfig  # noqa: PLC0415
    from streamd.scoring.prompt import ANSWER_PREFIX, render_video_prompt  # noqa: PLC0415
    from streamd.scoring.transformers_impl import TransformersBackend  # noqa: PLC0415

    config = ModelConfig(id=str(checkpoint), dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    backend = TransformersBackend(config, max_batch=1)
    backend.load()
    loaded = backend.checkpoint
    processor = AutoImageProcessor.from_pretrained(checkpoint)  # type: ignore[no-untyped-call]
    model = loaded.model
    if not isinstance(model, SmolVLMForConditionalGeneration):
        raise TypeError(f"expected a SmolVLM2 model, not {type(model).__name__}")
    stride = args.window_s - args.overlap_s
    with av.open(str(video)) as container:
        duration = (container.duration or 0) / av.time_base
        frames: list[tuple[float, npt.NDArray[np.uint8]]] = []
        for decoded in container.decode(video=0):
            t = float(decoded.time or 0.0)
            if t + 1e-6 >= len(frames) / args.sample_fps:
                # The same pixels streamd gives the model: squashed to 512x512 by swscale.
                image = decoded.to_ndarray(
                    width=IMAGE_SIZE, height=IMAGE_SIZE, format="rgb24", interpolation="BICUBIC"
                )
                frames.append((t, np.asarray(image, np.uint8)))
    start, windows = 0.0, 0
    while start < duration - 1e-6:
        end = min(start + args.window_s, duration)
        segment = [(t, image) for t, image in frames if start <= t < end]
        times = [t - start for t, _ in segment]
        text = render_video_prompt(
            PROMPT, times, end - start, loaded.image_seq_len, answer_prefix=ANSWER_PREFIX
        )
        ids = torch.tensor([loaded.encode(text)], device=loaded.device)
        pixels = processor([image for _, image in segment], return_tensors="pt")
        model.generate(
            input_ids=ids,
            pixel_values=pixels.pixel_values.to(loaded.device, loaded.dtype),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
        windows += 1
        if end >= duration:
            break
        start += stride
    print(json.dumps({"windows": windows}))
    return 0


def timed(argv: list[str]) -> tuple[float, str]:
    """Wall seconds of a whole process, and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoint and the clip once, then time the three ways."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-s", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--overlap-s", type=float, default=5.0)
    parser.add_argument("--sample-fps", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a built one")
    parser.add_argument("--ways", default="abc", help="which of a-d to run (a always runs)")
    parser.add_argument("--seed", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seed is not None:
        return seed_run(args.seed, args.checkpoint, args)

    from analysis import build_checkpoint, write_clip  # noqa: PLC0415

    from streamd.hardware import this_cpu  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="streamd-offline-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "smolvlm2-256m-random"
            build_checkpoint(checkpoint)
        video = Path(tmp) / "bars.mp4"
        write_clip(video, args.clip_s)
        common = [
            "--window-s", str(args.window_s), "--overlap-s", str(args.overlap_s),
            "--sample-fps", str(args.sample_fps), "--max-new-tokens", str(args.max_new_tokens),
            "--dtype", args.dtype,
        ]  # fmt: skip
        streamd = [
            sys.executable, "-m", "streamd", "analyze", str(video), "--backend", "transformers",
            "--model", str(checkpoint), *common,
        ]  # fmt: skip
        ways = {
            "a": [sys.executable, __file__, "--seed", str(video), "--checkpoint", str(checkpoint),
                  *common],
            "b": [*streamd, "--json", str(Path(tmp) / "b.json")],
            "c": [*streamd, "--describe-all", "--json", str(Path(tmp) / "c.json")],
            "d": [*streamd, "--vision-quantize", "int8", "--json", str(Path(tmp) / "d.json")],
        }  # fmt: skip
        print(f"cpu: {this_cpu().summary()}")
        print(
            f"clip {args.clip_s} s, windows {args.window_s:g} s with {args.overlap_s:g} s overlap"
            f" at {args.sample_fps:g} fps, max_new_tokens {args.max_new_tokens}, dtype {args.dtype}"
        )
        ways = {name: command for name, command in ways.items() if name in args.ways + "a"}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for round_ in range(args.rounds):
            for name, command in ways.items():
                took, out = timed(command)
                seconds[name].append(took)
                print(f"  round {round_ + 1} ({name}): {took:.1f} s", file=sys.stderr)
                if name == "a":
                    windows = json.loads(out.strip().splitlines()[-1])["windows"]
        labels = {
            "a": "seed, generate() per segment",
            "b": "streamd analyze",
            "c": "streamd analyze --describe-all",
            "d": "streamd analyze --vision-quantize int8",
        }
        for name, label in labels.items():
            if name in ways:
                print(f"({name}) {label}: {min(seconds[name]):.1f} s (best of {args.rounds})")
        for name in ("b", "c", "d"):
            if name not in ways:
                continue
            summary = json.loads((Path(tmp) / f"{name}.json").read_text())
            print(f"windows: {windows} (seed), {summary['windows']} ({name})")
            ratio = min(seconds["a"]) / min(seconds[name])
            print(f"ratio a/{name}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
