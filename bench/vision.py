"""SmolVLM2's vision encoder on this CPU: every path's s/frame against its GEMM peak and fp32.

One run measures, side by side:

- the hardware: fp32 / bf16 GEMM GFLOP/s at the encoder's own shapes (read from the
  checkpoint's ``vision_config``), int8 dynamic-quantized Linear GOP/s at the same shapes, and
  memory bandwidth (a large tensor copy and sum);
- the encoder's FLOPs per frame, counted from the config (linears + attention + connector);
- the vision encoder + connector per frame (``get_image_features``, what streamd runs) for:
  fp32 SDPA (streamd's default, the baseline), fp32 eager attention, fp32 on one thread,
  bf16, int8 dynamic quantization of the Linears (per channel: what
  ``model.vision_quantize: int8`` ships; per tensor), ``torch.compile``, and OpenVINO fp32 /
  int8 (NNCF static) when ``openvino`` / ``nncf`` import;
- each path's accuracy on real video frames: a textured moving scene rendered here, encoded
  with H.264 by PyAV, decoded and squashed to 512x512 by swscale as streamd's ingest does:
  cosine similarity of the per-frame features (connector output) to fp32's, and how often the
  argmax over the 10 digit tokens' logits after the answer prefix agrees with fp32's (windows
  of ``--window-frames`` frames, the fp32 text model reading each path's features);
- decode per token through ``TransformersBackend`` (a described window's ``generate_s`` /
  ``completion_tokens``), as bytes/s against the measured bandwidth.

Timings are noisy on a shared box: every frame is encoded by every path in the same round,
in rotating order, and each ratio is the median of per-round ratios to fp32 in that round.
With random weights (the default checkpoint: SmolVLM2-256M's dimensions, built offline by
``bench/analysis.py``) the digit agreement is a weak proxy: the logits are near-uniform noise,
so it flags large feature changes but cannot prove a real model answers alike.

    python bench/vision.py [--model DIR] [--frames 8] [--skip compile,openvino] [--json F]

OpenVINO rows need a Python with ``openvino`` (and ``nncf``) beside torch==2.13.0; pip's
``optimum-intel`` would replace torch and transformers, so it is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import torch
from analysis import build_checkpoint, sample_frames  # bench/analysis.py
from transformers import AutoModelForImageTextToText, PreTrainedModel

from streamd.config import ModelConfig
from streamd.domain import Frame, ScoreRequest, Window
from streamd.hardware import this_cpu
from streamd.scoring.prompt import PROFILES
from streamd.scoring.torch_cpu import usable_cores
from streamd.scoring.transformers_impl import TransformersBackend
from streamd.scoring.vision_quantize import quantize_linears

DEFAULT_MODEL = Path(tempfile.gettempdir()) / "real256"
CLIP_SIZE = (640, 360)
CLIP_FPS = 10
PROMPT = PROFILES["surveillance"]
KINDS = ("fp32", "bf16", "int8")
SKIPPABLE = (
    "eager",
    "one-thread",
    "bf16",
    "int8-tensor",
    "compile",
    "openvino",
    "openvino-int8",
    "decode",
)
Encode = Callable[[torch.Tensor], torch.Tensor]
"""``(1, 3, H, W)`` float32 pixels -> ``(image_seq_len, text_hidden)`` float32 features."""


# --- machine ---------------------------------------------------------------------------------


def cpu_summary() -> tuple[str, set[str]]:
    """CPU model, the SIMD/AMX flags that decide the kernels, torch threads; and the flags."""
    cpu = this_cpu()
    text = (
        f"cpu: {cpu.summary()}\n"
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}),"
        f" {torch.get_num_threads()} threads, quantized engine {torch.backends.quantized.engine}"
    )
    return text, set(cpu.flags)


def seconds_per_call(fn: Callable[[], object], min_s: float = 0.25, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean call time in a batch of calls lasting >= ``min_s``."""
    fn()  # warm: first-call allocations, kernel selection
    started = time.perf_counter()
    fn()
    once = max(time.perf_counter() - started, 1e-6)
    calls = max(1, math.ceil(min_s / once))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


@dataclass(slots=True)
class Gemm:
    """One GEMM shape: ``(m x k) @ (k x n)``, what ``nn.Linear(k, n)`` does to ``m`` tokens."""

    label: str
    m: int
    k: int
    n: int
    batch: int = 1
    rates: dict[str, float] = field(default_factory=dict)
    """GFLOP/s (GOP/s for int8) by kind."""

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n

    def keep(self, kind: str, rate: float) -> None:
        self.rates[kind] = max(rate, self.rates.get(kind, 0.0))


def encoder_gemms(vision: dict[str, Any]) -> list[Gemm]:
    """The vision encoder's GEMM shapes, from its config."""
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    hidden, inter = vision["hidden_size"], vision["intermediate_size"]
    heads = vision["num_attention_heads"]
    return [
        Gemm(f"q/k/v/out ({tokens}x{hidden})@({hidden}x{hidden})", tokens, hidden, hidden),
        Gemm(f"fc1 ({tokens}x{hidden})@({hidden}x{inter})", tokens, hidden, inter),
        Gemm(f"fc2 ({tokens}x{inter})@({inter}x{hidden})", tokens, inter, hidden),
        Gemm(
            f"attn QK^T {heads}x({tokens}x{hidden // heads})@(..x{tokens})",
            tokens,
            hidden // heads,
            tokens,
            heads,
        ),
    ]


def measure_gemms(gemms: Sequence[Gemm]) -> None:
    """Each shape's fp32, bf16 and int8-dynamic rates (int8: Linear shapes only); keeps the best.

    bf16 is ~10x slower than fp32 without AVX512-BF16/AMX: it is timed briefly.
    """
    torch.manual_seed(0)
    with torch.inference_mode():
        for gemm in gemms:
            for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                budget, repeats = (0.25, 3) if kind == "fp32" else (0.1, 1)
                seconds = seconds_per_call(gemm_call(gemm, dtype), budget, repeats)
                gemm.keep(kind, gemm.flops / seconds / 1e9)
            if gemm.batch == 1:
                gemm.keep("int8", gemm.flops / seconds_per_call(int8_call(gemm)) / 1e9)


def gemm_call(gemm: Gemm, dtype: torch.dtype) -> Callable[[], object]:
    """``F.linear`` as ``nn.Linear`` runs it; a batched matmul for attention's shapes."""
    if gemm.batch == 1:
        a, w = torch.randn(gemm.m, gemm.k, dtype=dtype), torch.randn(gemm.n, gemm.k, dtype=dtype)
        return lambda: torch.nn.functional.linear(a, w)
    q = torch.randn(gemm.batch, gemm.m, gemm.k, dtype=dtype)
    k = torch.randn(gemm.batch, gemm.k, gemm.n, dtype=dtype)
    return lambda: torch.bmm(q, k)


def int8_call(gemm: Gemm) -> Callable[[], object]:
    """The Linear as ``model.vision_quantize: int8`` runs it (activations quantized per call)."""
    linear = torch.nn.Sequential(torch.nn.Linear(gemm.k, gemm.n))
    quantize_linears(linear)
    x = torch.randn(gemm.m, gemm.k)
    return lambda: linear(x)


def measure_bandwidth(megabytes: int = 512) -> dict[str, float]:
    """GB/s of a tensor copy (read + write) and a sum (read), far beyond the caches."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy_s = seconds_per_call(lambda: dst.copy_(src), 0.5)
    sum_s = seconds_per_call(src.sum, 0.5)
    return {"copy": 2 * nbytes / copy_s / 1e9, "sum": nbytes / sum_s / 1e9}


# --- model costs -----------------------------------------------------------------------------


def vision_flops(config: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one frame through the vision encoder + connector (2 per multiply-add)."""
    vision = config["vision_config"]
    patch, side = vision["patch_size"], vision["image_size"]
    tokens = (side // patch) ** 2
    hidden, inter = vision["hidden_size"], vision["intermediate_size"]
    layers = vision["num_hidden_layers"]
    scale = int(config.get("scale_factor", 4))
    merged = (tokens // scale**2) * (hidden * scale**2)  # pixel shuffle: 64 x 12288 for 256M
    counts = {
        "patch embedding (conv)": 2 * tokens * hidden * 3 * patch * patch,
        "q/k/v/out projections": layers * 4 * 2 * tokens * hidden * hidden,
        "MLP fc1 + fc2": layers * 2 * 2 * tokens * hidden * inter,
        "attention QK^T + AV": layers * 2 * 2 * tokens * tokens * hidden,
        "connector (pixel shuffle + linear)": 2 * merged * config["text_config"]["hidden_size"],
    }
    return {name: float(value) for name, value in counts.items()}


def decoder_cost(model: PreTrainedModel, context: int) -> tuple[float, float]:
    """Bytes read and FLOPs per decoded token at ``context`` tokens of KV (fp32 weights).

    Every weight but the input embedding (one row of it is read) is read once per token; the
    KV cache of every earlier position is read once per layer.
    """
    text = model.config.text_config
    inner = model.model.text_model
    weights = (
        sum(p.numel() for name, p in inner.named_parameters() if "embed_tokens" not in name)
        + model.lm_head.weight.numel()
    )
    element = next(model.parameters()).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = text.num_hidden_layers
    kv = layers * 2 * text.num_key_value_heads * head_dim * context * element
    attention_flops = layers * 2 * 2 * text.num_attention_heads * head_dim * context
    return float(weights * element + kv), float(2 * weights + attention_flops)


# --- frames ----------------------------------------------------------------------------------


def smooth_noise(
    rng: np.random.Generator, height: int, width: int, cell: int
) -> npt.NDArray[np.float32]:
    """Value noise: random values on a ``cell``-px grid, bilinearly interpolated, in [0, 1]."""
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    ys = np.arange(height, dtype=np.float32) / cell
    xs = np.arange(width, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    out: npt.NDArray[np.float32] = top * (1 - fy) + bottom * fy
    return out


def texture(rng: np.random.Generator, height: int, width: int) -> npt.NDArray[np.float32]:
    """Multi-scale noise, like brick, foliage or tarmac: detail at every scale the encoder sees."""
    layers = [
        smooth_noise(rng, height, width, cell) * weight
        for cell, weight in ((64, 0.5), (16, 0.3), (4, 0.2))
    ]
    out: npt.NDArray[np.float32] = np.sum(layers, axis=0)
    return out


def render_scene(
    width: int, height: int, seconds: float, fps: int
) -> Iterator[npt.NDArray[np.uint8]]:
    """A street seen by a slowly panning camera: textured facade, road, walkers, a car, noise."""
    rng = np.random.default_rng(7)
    pan = 40
    wide = width + pan
    base = np.empty((height, wide, 3), np.float32)
    facade = texture(rng, height, wide)
    horizon = int(height * 0.62)
    for channel, (wall, road) in enumerate(((170, 90), (120, 92), (95, 96))):
        base[..., channel] = wall * (0.6 + 0.8 * facade)
        base[horizon:, :, channel] = road * (0.8 + 0.4 * texture(rng, height - horizon, wide))
    for x in range(30, wide, 110):  # windows in the facade
        base[40:120, x : x + 60] = (40, 60, 80) + 30 * facade[40:120, x : x + 60, None]
    base[horizon + 40 : horizon + 44, ::24] = 230  # lane marks
    ys, xs = np.mgrid[0:height, 0:width]
    walkers = [
        (rng.uniform(0, width), rng.uniform(25, 60), rng.uniform(0, 255, 3)) for _ in range(3)
    ]
    frames = round(seconds * fps)
    for i in range(frames):
        t = i / fps
        shift = int(pan * t / seconds)
        img = base[:, shift : shift + width].copy()
        img *= 1.0 + 0.08 * math.sin(2 * math.pi * t / 7)  # clouds passing
        for k, (x0, speed, color) in enumerate(walkers):
            cx = (x0 + speed * t * (1 if k % 2 else -1)) % width
            cy = horizon + 10 + 25 * k
            body = ((xs - cx) / 14) ** 2 + ((ys - cy) / 38) ** 2 < 1
            stripes = ((ys // 6) % 2).astype(np.float32)[..., None]
            img[body] = (color * (0.7 + 0.3 * stripes))[body]
            head = ((xs - cx) ** 2 + (ys - cy + 48) ** 2) < 12**2
            img[head] = (225, 185, 160)
        car_x = int((120 * t) % (width + 200)) - 200
        x_a, x_b = max(car_x, 0), min(car_x + 180, width)
        if x_b > x_a:
            img[horizon + 50 : horizon + 110, x_a:x_b] = (30, 50, 160)
            img[horizon + 55 : horizon + 75, x_a:x_b] = (150, 190, 210)
        img += rng.normal(0, 3, img.shape).astype(np.float32)  # sensor noise
        yield np.clip(img, 0, 255).astype(np.uint8)


def write_clip(path: Path, seconds: float) -> None:
    """The scene, 640x360 at 10 fps, H.264 (libx264, CRF 23) as a camera would send it."""
    width, height = CLIP_SIZE
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264", rate=CLIP_FPS, options={"crf": "23", "preset": "veryfast"}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in render_scene(width, height, seconds, CLIP_FPS):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


# --- vision paths ----------------------------------------------------------------------------


@dataclass(slots=True)
class VisionPath:
    """One way to run the vision encoder + connector on a frame."""

    name: str
    encode: Encode
    frames: int
    """How many of the run's frames it encodes (bf16 without AMX: 1)."""
    setup_s: float = 0.0
    note: str = ""
    kind: str = "fp32"
    """Which GEMM peak it runs on: fp32, bf16 or int8."""
    times: dict[int, float] = field(default_factory=dict)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    first_s: float = 0.0


def load_model(
    directory: Path, *, attn: str = "sdpa", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    model = AutoModelForImageTextToText.from_pretrained(
        directory, dtype=dtype, attn_implementation=attn
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model


def features_of(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> Encode:
    """``get_image_features`` on one frame, as ``FrameEncoder`` calls it."""

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        output = model.model.get_image_features(pixel_values=pixels.to(dtype).unsqueeze(1))
        features: torch.Tensor = output.pooler_output[0]
        return features.float()

    return encode


def one_thread(encode: Encode) -> Encode:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return encode(pixels)
        finally:
            torch.set_num_threads(threads)

    return run


class _Features(torch.nn.Module):
    """``features_of`` as a module holding the model: what OpenVINO's converter traces."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.inner = model.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.inner.get_image_features(pixel_values=pixel_values.unsqueeze(1))
        features: torch.Tensor = output.pooler_output[0]
        return features


def openvino_paths(
    model: PreTrainedModel,
    example: torch.Tensor,
    calibration: Sequence[torch.Tensor],
    threads: int,
    frames: int,
    skip: set[str],
) -> list[VisionPath]:
    """OpenVINO fp32 (converted from the torch model) and int8 (NNCF static, calibrated here)."""
    try:
        import openvino as ov  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        print("openvino: not importable here: OpenVINO rows skipped (see the docstring)")
        return []
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(_Features(model).eval(), example_input=example)
    core = ov.Core()
    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(converted, "CPU", settings)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")

    def runner(net: object) -> Encode:
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(net(pixels.numpy())[0].copy())  # type: ignore[operator]

        return encode

    paths = [
        VisionPath(
            "openvino fp32",
            runner(compiled),
            frames,
            time.perf_counter() - started,
            f"openvino {ov.__version__.split('-')[0]}, precision {precision}",
        )
    ]
    if "openvino-int8" in skip:
        return paths
    try:
        import nncf  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        print("nncf: not importable here: OpenVINO int8 row skipped")
        return paths
    nncf.set_log_level(logging.WARNING)  # its tables would land in the report
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        compressed = nncf.compress_weights(
            converted.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM
        )
    net = core.compile_model(compressed, "CPU", settings)
    group = net.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")
    paths.append(
        VisionPath(
            "openvino int8 weights, dyn. activations",
            runner(net),
            frames,
            time.perf_counter() - started,
            f"nncf compress_weights INT8_ASYM; CPU dynamic quantization group {group}",
            "int8",
        )
    )
    started = time.perf_counter()
    data = nncf.Dataset([pixels.numpy() for pixels in calibration])
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(
            converted, data, subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER
        )
    net = core.compile_model(quantized, "CPU", settings)
    paths.append(
        VisionPath(
            "openvino int8 static (nncf quantize)",
            runner(net),
            frames,
            time.perf_counter() - started,
            f"calibrated on {len(calibration)} other frames of the clip",
            "int8",
        )
    )
    return paths


# --- scoring ---------------------------------------------------------------------------------


def digit_logits(
    backend: TransformersBackend, request: ScoreRequest, features: torch.Tensor
) -> torch.Tensor:
    """The digits' logits where the score is read, the fp32 text model reading ``features``."""
    checkpoint = backend.checkpoint
    digits = checkpoint.digits
    if digits is None:
        raise RuntimeError("the tokenizer has no digit tokens: no score to compare")
    model = checkpoint.model
    ids = torch.tensor([checkpoint.encode(backend.prompt_text(request))])
    embeds = model.get_input_embeddings()(ids)
    slots = (ids == checkpoint.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    hidden = model.model(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids)
    ).last_hidden_state
    logits: torch.Tensor = model.lm_head(hidden[:, -1])[0, list(digits.digit_ids)]
    return logits


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    )


def digit_table(
    backend: TransformersBackend, paths: Sequence[VisionPath], frames: Sequence[Frame], size: int
) -> tuple[dict[str, list[torch.Tensor]], int, float]:
    """Each full path's digit logits over windows of ``size`` frames, stride ``size // 2``.

    Returns the logits by path, the number of windows, and the max |diff| between this
    script's fp32 prefill and the backend's own ``next_token_logits`` (a check of the former).
    """
    n = len(frames)
    starts = range(0, n - size + 1, max(1, size // 2))
    windows = [
        ScoreRequest(
            Window("bench", s + 1, float(s), float(s + size), tuple(frames[s : s + size]), 0.0),
            PROMPT,
        )
        for s in starts
    ]
    table = {
        path.name: [
            digit_logits(backend, request, torch.cat([path.features[s + j] for j in range(size)]))
            for s, request in zip(starts, windows, strict=True)
        ]
        for path in paths
        if len(path.features) == n
    }
    digits = backend.checkpoint.digits
    assert digits is not None  # digit_logits raised otherwise  # noqa: S101
    own = backend.next_token_logits(windows[:1])[0, list(digits.digit_ids)]
    return table, len(windows), float((own - table[paths[0].name][0]).abs().max())


def build_paths(
    args: argparse.Namespace,
    skip: set[str],
    backend: TransformersBackend,
    example: torch.Tensor,
    calibration: Sequence[torch.Tensor],
    fast_bf16: bool,
) -> list[VisionPath]:
    """Every path this run measures; the first, streamd's default, is the baseline."""
    n, threads = args.frames, torch.get_num_threads()
    base = backend.checkpoint.model
    paths = [VisionPath("fp32 sdpa (streamd default)", features_of(base), n)]
    if "eager" not in skip:
        eager = features_of(load_model(args.model, attn="eager"))
        paths.append(VisionPath("fp32 eager attention", eager, n))
    if "one-thread" not in skip and threads > 1:
        single = one_thread(features_of(base))
        paths.append(VisionPath("fp32 sdpa, 1 thread", single, min(2, n), note="2 frames"))
    if "bf16" not in skip:
        bf16 = features_of(load_model(args.model, dtype=torch.bfloat16), torch.bfloat16)
        note = "" if fast_bf16 else "no AVX512-BF16/AMX: 1 frame"
        paths.append(VisionPath("bf16 sdpa", bf16, n if fast_bf16 else 1, note=note, kind="bf16"))
    for per_channel in (True, False):
        if not per_channel and "int8-tensor" in skip:
            continue
        started = time.perf_counter()
        model = load_model(args.model)
        layers = quantize_linears(model.model.vision_model, per_channel=per_channel)
        layers += quantize_linears(model.model.connector, per_channel=per_channel)
        name = "int8 dynamic, per channel (shipped)" if per_channel else "int8 dynamic, per tensor"
        setup_s = time.perf_counter() - started
        paths.append(VisionPath(name, features_of(model), n, setup_s, f"{layers} Linears", "int8"))
    if "compile" not in skip:
        compiled = torch.compile(features_of(base))
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(example)
        setup_s = time.perf_counter() - started
        paths.append(
            VisionPath("fp32 torch.compile (inductor)", compiled, n, setup_s, "setup: compile")
        )
    if "openvino" not in skip:
        try:
            paths += openvino_paths(base, example, calibration, threads, n, skip)
        except Exception as exc:  # an optional path must not end the run
            print(f"openvino: failed ({type(exc).__name__}: {str(exc).splitlines()[0]}): skipped")
    return paths


def time_paths(paths: Sequence[VisionPath], pixels: Sequence[torch.Tensor]) -> None:
    """Encode frame ``r`` with every path in round ``r``, the order rotating each round."""
    print(f"\n{len(paths)} paths x {len(pixels)} frames, interleaved:", file=sys.stderr)
    with torch.inference_mode():
        for path in paths:  # warm-up: first-call costs are not a frame's cost
            started = time.perf_counter()
            path.encode(pixels[0])
            path.first_s = time.perf_counter() - started
        for r, frame in enumerate(pixels):
            shift = r % len(paths)
            for path in [*paths[shift:], *paths[:shift]]:
                if r < path.frames:
                    started = time.perf_counter()
                    path.features[r] = path.encode(frame)
                    path.times[r] = time.perf_counter() - started
            line = ", ".join(
                f"{p.name.split(' (')[0]} {p.times[r]:.2f}" for p in paths if r in p.times
            )
            print(f"  frame {r + 1}/{len(pixels)}: {line}", file=sys.stderr)


def path_rows(
    paths: Sequence[VisionPath],
    logits: dict[str, list[torch.Tensor]],
    peak: dict[str, float],
    gflop: float,
) -> list[dict[str, Any]]:
    """One result row per path, against the first (fp32) measured in the same rounds."""
    baseline = paths[0]
    rows = []
    for path in paths:
        median_s = statistics.median(path.times.values())
        rate = gflop / median_s
        own_peak = peak[path.kind] / (torch.get_num_threads() if "1 thread" in path.name else 1)
        cos = [cosine(path.features[r], baseline.features[r]) for r in path.features]
        agree, shift = None, None
        if path.name in logits:
            pairs = list(zip(logits[path.name], logits[baseline.name], strict=True))
            agree = f"{sum(int(a.argmax()) == int(b.argmax()) for a, b in pairs)}/{len(pairs)}"
            shift = max(
                float((a.log_softmax(-1) - b.log_softmax(-1)).abs().max()) for a, b in pairs
            )
        rows.append(
            {
                "path": path.name,
                "s_per_frame": median_s,
                "frames": len(path.times),
                "vs_fp32": statistics.median(baseline.times[r] / t for r, t in path.times.items()),
                "gflops": rate,
                "of_fp32_peak": rate / peak["fp32"],
                "of_own_peak": rate / own_peak if own_peak else float("nan"),
                "cos_mean": statistics.fmean(cos),
                "cos_min": min(cos),
                "digits_agree": agree,
                "digit_logp_shift": shift,
                "setup_s": path.setup_s,
                "first_call_s": path.first_s,
                "note": path.note,
            }
        )
    return rows


def measure_decode(
    backend: TransformersBackend, frames: Sequence[Frame], baseline: VisionPath, size: int
) -> dict[str, float] | None:
    """s/token of described windows through the backend (their frames' features cached)."""
    for i, frame in enumerate(frames):
        backend.cache.put((frame.stream, frame.index), baseline.features[i].clone())
    backend.warm_up()
    tokens, seconds, context = 0, 0.0, 0
    for start in (0, max(0, len(frames) - size)):
        shots = tuple(frames[start : start + size])
        window = Window("bench", start + 1, float(start), float(start + size), shots, 0.0)
        request = ScoreRequest(window, PROMPT)
        (score,) = backend.score([request])
        tokens += score.timings.completion_tokens
        seconds += score.timings.generate_s
        context = len(backend.checkpoint.encode(backend.prompt_text(request)))
    if tokens == 0:
        print("decode: the random model stopped at once: no tokens to time")
        return None
    nbytes, flops = decoder_cost(backend.checkpoint.model, context + tokens // 4)
    return {
        "tokens": tokens,
        "s_per_token": seconds / tokens,
        "context": context,
        "bytes_per_token": nbytes,
        "gflop_per_token": flops / 1e9,
        "gbs": nbytes / (seconds / tokens) / 1e9,
    }


def print_flops(flops: dict[str, float], source: Path) -> None:
    print(f"\nvision FLOPs per frame, from {source}/config.json (2 per multiply-add):")
    for name, value in flops.items():
        print(f"  {name:36s} {value / 1e9:7.2f} GFLOP")
    print(f"  {'total':36s} {sum(flops.values()) / 1e9:7.2f} GFLOP (the issue says ~214)")


def print_hardware(gemms: Sequence[Gemm], bandwidth: dict[str, float]) -> None:
    print(f"\nhardware, {torch.get_num_threads()} threads (best of a pass before and one after):")
    print(f"  {'GEMM shape':48s} {'fp32':>8s} {'bf16':>8s} {'int8dyn':>8s}  GFLOP/s (GOP/s)")
    for gemm in gemms:
        cells = [f"{gemm.rates[k]:8.1f}" if k in gemm.rates else f"{'-':>8s}" for k in KINDS]
        print(f"  {gemm.label:48s} {' '.join(cells)}")
    print(
        f"  memory bandwidth: copy {bandwidth['copy']:.1f} GB/s (read + write),"
        f" sum {bandwidth['sum']:.1f} GB/s (read)"
    )


def print_paths(rows: Sequence[dict[str, Any]], gflop: float, peak: dict[str, float]) -> None:
    print(
        f"\nvision encoder + connector, {gflop:.1f} GFLOP/frame; peaks: fp32 {peak['fp32']:.0f},"
        f" bf16 {peak['bf16']:.0f} GFLOP/s, int8 {peak['int8']:.0f} GOP/s"
    )
    print(
        f"  {'path':40s} {'s/frame':>7s} {'vs fp32':>7s} {'GFLOP/s':>7s} {'of fp32':>7s}"
        f" {'of own':>6s} {'cos mean':>9s} {'cos min':>8s} {'digits':>6s} {'dlogp':>6s}"
        f" {'setup':>6s}  note"
    )
    print(f"  {'':40s} {'median':>7s} {'(x)':>7s} {'':>7s} {'peak':>7s} {'peak':>6s}")
    for row in rows:
        shift = row["digit_logp_shift"]
        print(
            f"  {row['path']:40s} {row['s_per_frame']:7.2f} {row['vs_fp32']:7.2f}"
            f" {row['gflops']:7.1f} {row['of_fp32_peak']:7.0%} {row['of_own_peak']:6.0%}"
            f" {row['cos_mean']:9.5f} {row['cos_min']:8.5f} {row['digits_agree'] or '-':>6s}"
            f" {'-' if shift is None else f'{shift:.3f}':>6s} {row['setup_s']:6.1f}  {row['note']}"
        )


def print_legend(windows: int, size: int, sanity: float) -> None:
    print(
        "  s/frame: median over the frames each path encoded. vs fp32: median of per-frame\n"
        "  ratios to fp32 sdpa in the same round. of own peak: int8 rows against the int8 GEMM\n"
        "  rate, bf16 against bf16's, the 1-thread row against half the fp32 peak. cos: features\n"
        f"  (64x576 per frame) vs fp32 sdpa. digits: argmax of the 10 digit logits agrees with\n"
        f"  fp32 over {windows} windows of {size} frames, the fp32 text model reading each path's\n"
        "  features; dlogp: their largest log-probability change. Random weights make digits a\n"
        "  weak proxy (near-uniform logits). Check: this script's fp32 prefill vs the backend's,\n"
        f"  max |diff| {sanity:.1e}."
    )


def print_decode(decode: dict[str, float], bandwidth: dict[str, float]) -> None:
    per_token = decode["s_per_token"]
    print(
        f"\ndecode (TransformersBackend, fp32): {per_token * 1e3:.1f} ms/token"
        f" ({1 / per_token:.1f} tokens/s over {decode['tokens']:.0f} tokens,"
        f" context ~{decode['context']:.0f})\n"
        f"  per token {decode['bytes_per_token'] / 1e6:.0f} MB read (weights once + KV),"
        f" {decode['gflop_per_token']:.2f} GFLOP -> {decode['gbs']:.1f} GB/s ="
        f" {decode['gbs'] / bandwidth['copy']:.0%} of copy bandwidth,"
        f" {decode['gbs'] / bandwidth['sum']:.0%} of read bandwidth"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add = parser.add_argument
    add("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint dir (built if missing)")
    add("--frames", type=int, default=8, help="video frames each path encodes (default 8)")
    add("--window-frames", type=int, default=4, help="frames per scored window (default 4)")
    add("--tokens", type=int, default=24, help="decode: most tokens per description")
    add("--threads", type=int, default=0, help="torch threads (default: the usable cores)")
    add("--skip", default="", help=f"comma list of: {','.join(SKIPPABLE)}")
    add("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if unknown := skip - set(SKIPPABLE):
        parser.error(f"--skip: unknown {', '.join(sorted(unknown))}")
    if not 1 <= args.window_frames <= args.frames:
        parser.error("--window-frames must be between 1 and --frames")
    torch.set_num_threads(args.threads or usable_cores())
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
    warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated")

    summary, flags = cpu_summary()
    print(summary)
    if not (args.model / "config.json").exists():
        print(f"building a random SmolVLM2-256M-sized checkpoint in {args.model} ...")
        build_checkpoint(args.model)
    config = json.loads((args.model / "config.json").read_text())
    # The hardware before the models take memory, and again at the end: the peak is the best.
    gemms = encoder_gemms(config["vision_config"])
    measure_gemms(gemms)
    bandwidth = measure_bandwidth()
    flops = vision_flops(config)
    print_flops(flops, args.model)
    gflop = sum(flops.values()) / 1e9

    side = int(config["vision_config"]["image_size"])
    frames, calibration = video_frames(args.frames, side)
    print(
        f"\nframes: {len(frames)} of an H.264 {CLIP_SIZE[0]}x{CLIP_SIZE[1]} street scene"
        f" at 1 fps, squashed to {side}x{side} by swscale"
    )
    model_config = ModelConfig(
        id=str(args.model),
        device="cpu",
        dtype="float32",
        threads=torch.get_num_threads(),
        max_new_tokens=args.tokens,
    )
    # Random weights put ~0 mass on digits: read them all the same.
    backend = TransformersBackend(model_config, max_batch=1, min_digit_mass=0.0)
    backend.load()
    encoder = backend.frame_encoder
    pixels = [encoder.pixel_values([frame.image]) for frame in frames]
    calib = [encoder.pixel_values([frame.image]) for frame in calibration]
    fast_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    paths = build_paths(args, skip, backend, pixels[0], calib, fast_bf16)
    time_paths(paths, pixels)
    with torch.inference_mode():
        logits, windows, sanity = digit_table(backend, paths, frames, args.window_frames)

    measure_gemms(gemms)
    again = measure_bandwidth()
    bandwidth = {key: max(value, again[key]) for key, value in bandwidth.items()}
    decode = None
    if "decode" not in skip:
        decode = measure_decode(backend, frames, paths[0], args.window_frames)
    backend.close()

    peak = {kind: max(g.rates.get(kind, 0.0) for g in gemms) for kind in KINDS}
    rows = path_rows(paths, logits, peak, gflop)
    print_hardware(gemms, bandwidth)
    print_paths(rows, gflop, peak)
    print_legend(windows, args.window_frames, sanity)
    if decode:
        print_decode(decode, bandwidth)
    if args.json:
        results = {
            "cpu": summary,
            "threads": torch.get_num_threads(),
            "gemms": [{"shape": g.label, **g.rates} for g in gemms],
            "bandwidth_gbs": bandwidth,
            "vision_gflop": flops,
            "paths": rows,
            "decode": decode,
        }
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def video_frames(count: int, side: int) -> tuple[list[Frame], list[Frame]]:
    """``count`` frames at 1 fps of the street clip, and 2 calibration frames between them.

    Sampled at 2 fps: the even frames are the test frames (streamd's 1 fps), the odd ones
    calibrate OpenVINO's static int8, so it is not calibrated on the frames it is tested on.
    """
    with tempfile.TemporaryDirectory(prefix="streamd-vision-") as tmp:
        clip = Path(tmp) / "street.mp4"
        write_clip(clip, count + 1)
        sampled = sample_frames(clip, 2.0, side)
    shots = [f for f in sampled if f.index % 2 == 0][:count]
    if len(shots) < count:
        raise SystemExit(f"the clip gave {len(shots)} frames, not {count}")
    frames = [Frame("bench", i, float(i), 0.0, f.image, CLIP_SIZE) for i, f in enumerate(shots)]
    return frames, [f for f in sampled if f.index % 2 == 1][:2]


if __name__ == "__main__":
    raise SystemExit(main())
