"""Windows/s of streamd's cached SmolVLM2 path vs one full forward per window, at 256M dimensions.

Builds a SmolVLM2 with the real SmolVLM2-256M dimensions and random weights (compute does not
depend on the weights; nothing is downloaded), writes a clip of moving bars with PyAV, samples
it at 1 fps to 512x512 with the ingest path's swscale call, cuts 8 s windows every 2 s and
scores every window twice, interleaved so that load on the machine hits both alike:

(a) the seed's method: image processor + ``model.generate(pixel_values=...)`` per window;
(b) ``TransformersBackend``: per-frame vision cache, score from the digit logits, description.

    python bench/analysis.py [--frames-s 30] [--dtype auto] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import (
    AutoImageProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from streamd.config import ModelConfig
from streamd.domain import Frame, ScoreRequest, Window
from streamd.scoring.prompt import ANSWER_PREFIX, PROFILES, render_video_prompt
from streamd.scoring.transformers_impl import TransformersBackend
from tests.tiny_smolvlm import TRAILING_SPECIALS, save_processor_files, train_bpe, wrap_tokenizer

# SmolVLM2-256M-Video-Instruct (see shared/platform-facts.md).
BASE_VOCAB = 49152
VOCAB = 49280
IMAGE_TOKEN_ID = 49190
IMAGE_SIZE = 512
IMAGE_SEQ_LEN = 64
CLIP_SIZE = (64, 48)
CLIP_FPS = 10
BAR_PERIOD_PX = 16
PROMPT = PROFILES["surveillance"]


def real_sized_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny test BPE padded to SmolVLM2's 49,280 ids, its special tokens at the real ids."""
    spec = json.loads(train_bpe().to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for filler in range(len(vocab), BASE_VOCAB):  # unreachable by merges: ids only
        vocab[f"<unused_{filler}>"] = filler
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    eou = TRAILING_SPECIALS[-1]
    before_image = [f"<reserved_{i}>" for i in range(BASE_VOCAB, IMAGE_TOKEN_ID - 1)]
    vision = list(TRAILING_SPECIALS[:-1])  # <fake_token_around_image> lands at 49189
    after = [f"<reserved_{i}>" for i in range(IMAGE_TOKEN_ID - 1 + len(vision), VOCAB - 1)]
    tokenizer.add_special_tokens([*before_image, *vision, *after, eou])
    wrapped = wrap_tokenizer(tokenizer)
    if len(wrapped) != VOCAB or wrapped.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID:
        raise RuntimeError("padded tokenizer does not have SmolVLM2's layout")
    return wrapped


def build_checkpoint(directory: Path) -> float:
    """Write a random SmolVLM2 of the real 256M dimensions; returns its parameters in millions."""
    tokenizer = real_sized_tokenizer()
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": IMAGE_SIZE,
        "patch_size": 16,
    }
    config = SmolVLMConfig(
        text_config=text.to_dict(),
        vision_config=vision,
        scale_factor=4,
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    save_processor_files(directory, tokenizer, IMAGE_SEQ_LEN, IMAGE_SIZE)
    return sum(p.numel() for p in model.parameters()) / 1e6


def write_clip(path: Path, seconds: int) -> None:
    """Vertical bars moving 4 px per frame, mpeg4: steady motion in every window."""
    width, height = CLIP_SIZE
    columns = np.arange(width)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * CLIP_FPS):
            lit = ((columns + 4 * i) // (BAR_PERIOD_PX // 2)) % 2 == 0
            row = np.where(lit, 255, 0).astype(np.uint8)
            image = np.ascontiguousarray(np.broadcast_to(row[None, :, None], (height, width, 3)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def sample_frames(path: Path, fps: float, side: int) -> list[Frame]:
    """1 frame per ``1/fps`` s, squashed to ``side`` x ``side`` by swscale as ingest does."""
    frames: list[Frame] = []
    with av.open(str(path)) as container:
        for decoded in container.decode(video=0):
            pts_s = float(decoded.time or 0.0)
            if pts_s + 1e-6 < len(frames) / fps:
                continue
            image = decoded.to_ndarray(
                width=side, height=side, format="rgb24", interpolation="BICUBIC"
            )
            rgb = np.asarray(image, dtype=np.uint8)  # rgb24 is uint8; the stub types all formats
            frames.append(Frame("bench", len(frames), pts_s, 0.0, rgb, CLIP_SIZE))
    return frames


def cut_windows(
    frames: Sequence[Frame], window_s: float, stride_s: float, duration_s: float
) -> list[Window]:
    """Windows ``[start, start + window_s)`` every ``stride_s`` that fit in the clip."""
    windows: list[Window] = []
    start = 0.0
    while start + window_s <= duration_s + 1e-6:
        inside = tuple(f for f in frames if start <= f.pts_s < start + window_s)
        windows.append(Window("bench", len(windows) + 1, start, start + window_s, inside, 0.0))
        start += stride_s
    return windows


@dataclass(slots=True)
class Counter:
    """Counts forward calls of a module and the batch rows they saw."""

    calls: int = 0
    rows: int = 0

    def hook(
        self,
        module: torch.nn.Module,
        args: tuple[torch.Tensor, ...],
        kwargs: dict[str, torch.Tensor],
        output: object,
    ) -> None:
        self.calls += 1
        inputs = kwargs.get("pixel_values", args[0] if args else None)
        self.rows += 0 if inputs is None else int(inputs.shape[0])


class SeedMethod:
    """What streamd replaces: every window on its own, processor + generate() with pixels."""

    def __init__(self, backend: TransformersBackend, directory: Path, max_new_tokens: int):
        self._checkpoint = backend.checkpoint
        self._processor = AutoImageProcessor.from_pretrained(directory)  # type: ignore[no-untyped-call]
        self._max_new_tokens = max_new_tokens

    def run(self, window: Window) -> None:
        """Analyse one window from scratch."""
        checkpoint = self._checkpoint
        times = [frame.pts_s - window.start_s for frame in window.frames]
        text = render_video_prompt(
            PROMPT, times, window.duration_s, checkpoint.image_seq_len, answer_prefix=ANSWER_PREFIX
        )
        ids = torch.tensor([checkpoint.encode(text)], device=checkpoint.device)
        pixels = self._processor([frame.image for frame in window.frames], return_tensors="pt")
        model = checkpoint.model
        if not isinstance(model, SmolVLMForConditionalGeneration):
            raise TypeError(f"expected a SmolVLM2 model, not {type(model).__name__}")
        model.generate(
            input_ids=ids,
            pixel_values=pixels.pixel_values.to(checkpoint.device),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self._max_new_tokens,
            do_sample=False,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames-s", type=int, default=30, help="clip length, seconds")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--stride-s", type=float, default=2.0)
    parser.add_argument("--sample-fps", type=float, default=1.0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp:
        directory = Path(tmp) / "smolvlm2-256m-random"
        started = time.perf_counter()
        params_m = build_checkpoint(directory)
        write_clip(Path(tmp) / "bars.mp4", args.frames_s)
        frames = sample_frames(Path(tmp) / "bars.mp4", args.sample_fps, IMAGE_SIZE)
        windows = cut_windows(frames, args.window_s, args.stride_s, args.frames_s)
        config = ModelConfig(
            id=str(directory), dtype=args.dtype, max_new_tokens=args.max_new_tokens
        )
        # Random weights put ~0 mass on digits; a real checkpoint answers with one.
        backend = TransformersBackend(config, max_batch=1, min_digit_mass=0.0)
        backend.load()
        seed = SeedMethod(backend, directory, args.max_new_tokens)
        setup_s = time.perf_counter() - started
        print(f"setup {setup_s:.1f} s: {params_m:.1f} M params, {backend.describe()}")
        print(
            f"clip {args.frames_s} s -> {len(frames)} frames at {args.sample_fps:g} fps, "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}; {len(windows)} windows of {args.window_s:g} s "
            f"every {args.stride_s:g} s; max_new_tokens {args.max_new_tokens}"
        )
        warm = Window("warm", 0, 0.0, 2.0, tuple(frames[:2]), 0.0)
        seed.run(warm)
        backend.warm_up()
        run_comparison(backend, seed, windows, len(frames))
        backend.close()
    return 0


def run_comparison(
    backend: TransformersBackend, seed: SeedMethod, windows: Sequence[Window], frame_count: int
) -> None:
    """Score every window both ways, interleaved, and print windows/s and vision calls."""
    model = backend.checkpoint.model
    vision_rows = {"a": Counter(), "b": Counter()}
    lm_steps = {"a": Counter(), "b": Counter()}
    seconds: dict[str, list[float]] = {"a": [], "b": []}
    stages = np.zeros(3)
    for window in windows:
        for name in ("a", "b"):
            vision = model.model.vision_model.register_forward_hook(
                vision_rows[name].hook, with_kwargs=True
            )
            head = model.lm_head.register_forward_hook(lm_steps[name].hook, with_kwargs=True)
            started = time.perf_counter()
            if name == "a":
                seed.run(window)
            else:
                (score,) = backend.score([ScoreRequest(window, PROMPT)])
                timings = score.timings
                stages += (timings.vision_s, timings.prefill_s, timings.generate_s)
            seconds[name].append(time.perf_counter() - started)
            vision.remove()
            head.remove()
        print(
            f"  window {window.seq}/{len(windows)}: (a) {seconds['a'][-1]:.1f} s,"
            f" (b) {seconds['b'][-1]:.1f} s",
            file=sys.stderr,
        )
    for name, label in (("a", "seed, full forward per window"), ("b", "streamd, cached vision")):
        total = sum(seconds[name])
        print(
            f"({name}) {label}: {len(windows) / total:.4f} windows/s ({total:.1f} s);"
            f" vision {vision_rows[name].rows / frame_count:.2f} calls per sampled frame;"
            f" {lm_steps[name].calls / len(windows):.1f} LM forwards per window"
        )
    vision_s, prefill_s, generate_s = stages / len(windows)
    print(
        f"    (b) per window: vision {vision_s:.2f} s, prefill+score {prefill_s:.2f} s,"
        f" description {generate_s:.2f} s"
    )
    ratio = sum(seconds["a"]) / sum(seconds["b"])
    # After the first window, (b) encodes only the stride's new frames: its steady state.
    steady = sum(seconds["a"][1:]) / max(sum(seconds["b"][1:]), 1e-9)
    print(
        f"ratio b/a: {ratio:.2f}x over all windows, {steady:.2f}x after the first;"
        f" dtype {backend.checkpoint.dtype}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
