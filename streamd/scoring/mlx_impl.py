"""SmolVLM2 on mlx-vlm (Apple Silicon): the score read from the digit logits, then a description."""

from __future__ import annotations

import gc
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import huggingface_hub
import mlx.core as mx
import mlx_vlm
import numpy as np
import numpy.typing as npt
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from mlx import nn
from mlx_vlm.models.cache import make_prompt_cache

from streamd.config import DEFAULT_MODEL_ID, ModelConfig
from streamd.domain import Frame, Score, ScoreRequest, StageTimings, Window
from streamd.errors import ModelError
from streamd.scoring.prompt import (
    ANSWER_PREFIX,
    DESCRIPTION_PREFIX,
    PROFILES,
    VideoTokens,
    clean_description,
    parse_answer,
    render_video_prompt,
)

logger = logging.getLogger(__name__)

TESTED_MLX_VLM = "0.7.10"
"""The release this module was written against (pinned in the ``mlx`` extra): it reaches past
``mlx_vlm.generate`` into ``Model.get_input_embeddings``, ``language_model`` and the KV cache,
which move between releases."""
DEFAULT_MIN_DIGIT_MASS = 0.5
"""As in the transformers backend: below this probability of a digit after the prefix, let the
model answer in free text and parse that."""
FREE_TEXT_EXTRA_TOKENS = 8
"""Free-text answers also spend tokens on the score and "Description:"."""
WARM_UP_STREAM = "<warm-up>"
# What mlx_vlm.load fetches from the hub (its own list, minus code and sentencepiece files).
_HUB_FILES = ["*.json", "*.jsonl", "*.safetensors", "*.txt", "*.jinja"]
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _Tokenizer(Protocol):
    """The part of the transformers tokenizer (``processor.tokenizer``) used here."""

    eos_token_id: int | None

    def __len__(self) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def batch_decode(self, ids: list[list[int]]) -> list[str]: ...
    def convert_tokens_to_ids(self, token: str) -> int: ...


class _LayerCache(Protocol):
    """One layer's KV cache (``mlx_vlm.models.cache.KVCache``)."""

    def trim(self, n: int) -> int: ...


@dataclass(frozen=True, slots=True)
class DigitTokens:
    """How the tokenizer writes a score after the answer prefix (see ``find_digit_tokens``)."""

    lead: str
    digit_ids: tuple[int, ...]
    description_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MlxCheckpoint:
    """A loaded SmolVLM2 and what scoring needs to know about it."""

    model: nn.Module
    tokenizer: _Tokenizer
    image_side: int
    image_seq_len: int
    image_token_id: int
    rescale: float
    mean: npt.NDArray[np.float32]
    std: npt.NDArray[np.float32]
    digits: DigitTokens | None
    stop_ids: frozenset[int]
    newline_ids: frozenset[int]


@dataclass(slots=True)
class _Answer:
    text: str
    significance: int | None = None
    feed: list[int] = field(default_factory=list)
    generate: bool = False
    free_text: bool = False


class MlxBackend:
    """SmolVLM2 on mlx-vlm; see ``streamd.scoring.base.ScoringBackend``.

    Frames go in as pixel values the way SmolVLM2's video processor makes them (one 512px
    square per frame, never tiled) with the exact video prompt, tokenized here: mlx-vlm's
    own processor would tile frames of checkpoints that tile images. Like the transformers
    backend, the score is the most likely of "1".."10" read from the next-token logits after
    the answer prefix, and only the description is generated (greedy), so ``describe_below``
    saves the decode. In free-text mode (a tokenizer that merges digits, or too little digit
    probability) the answer is generated and parsed; ``describe_below`` then saves nothing.
    One window per call, no vision cache. On Linux CPU this is ~57x slower than torch.
    """

    name = "mlx"

    def __init__(
        self, config: ModelConfig, *, min_digit_mass: float = DEFAULT_MIN_DIGIT_MASS
    ) -> None:
        self.model_id = config.id
        self._config = config
        self._min_digit_mass = min_digit_mass
        self._checkpoint: MlxCheckpoint | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)``: the vision encoder's square input."""
        side = self.checkpoint.image_side
        return side, side

    @property
    def max_batch(self) -> int:
        """One window per ``score`` call."""
        return 1

    @property
    def checkpoint(self) -> MlxCheckpoint:
        """The loaded model and its facts; ``ModelError`` before ``load``."""
        if self._checkpoint is None:
            raise ModelError(f"{self.model_id} is not loaded: call load() first")
        return self._checkpoint

    def load(self) -> None:
        """Load the checkpoint; raises ``ModelError`` with one line naming the model and a fix.

        ``model.device: cpu`` makes mlx compute on the CPU; any other value keeps mlx's default
        device (the GPU on Apple Silicon). ``model.dtype`` other than ``auto`` casts the weights.
        """
        if mlx_vlm.__version__ != TESTED_MLX_VLM:
            logger.warning(
                "mlx-vlm %s is untested: streamd pins %s", mlx_vlm.__version__, TESTED_MLX_VLM
            )
        if self._config.device == "cpu":
            mx.set_default_device(mx.cpu)
        self._checkpoint = load_checkpoint(self._config)
        mode = (
            f"digit logits after {self._checkpoint.digits.lead!r}"
            if self._checkpoint.digits
            else "free text"
        )
        logger.info("loaded %s, score from %s", self.describe(), mode)

    def warm_up(self) -> None:
        """Score one throwaway 2-frame window: the first real one then pays no one-off cost."""
        width, height = self.input_size
        frames = tuple(
            Frame(WARM_UP_STREAM, i, float(i), 0.0, np.full((height, width, 3), 60 * i, np.uint8))
            for i in range(2)
        )
        self.score(
            [ScoreRequest(Window(WARM_UP_STREAM, 0, 0.0, 2.0, frames, 0.0), PROFILES["scene"])]
        )

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score at most one window; one ``Score`` per request."""
        if len(requests) > self.max_batch:
            raise ValueError(f"{len(requests)} requests exceed max_batch={self.max_batch}")
        checkpoint = self.checkpoint
        try:
            return [self._score_one(checkpoint, request) for request in requests]
        except RuntimeError as exc:  # mlx reports allocation and kernel failures this way
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"mlx failed scoring with {self.model_id}: {line}") from exc

    def prompt_text(self, request: ScoreRequest) -> str:
        """The exact text the model reads for ``request``, up to where the score is read."""
        checkpoint = self.checkpoint
        window = request.window
        text = render_video_prompt(
            request.prompt,
            [frame.pts_s - window.start_s for frame in window.frames],
            window.duration_s,
            checkpoint.image_seq_len,
        )
        return text + (checkpoint.digits.lead if checkpoint.digits else "")

    def prompt_ids(self, request: ScoreRequest) -> list[int]:
        """Token ids of ``prompt_text``; ``ModelError`` if the image tokens do not add up."""
        checkpoint = self.checkpoint
        ids = list(checkpoint.tokenizer.encode(self.prompt_text(request), add_special_tokens=False))
        expected = len(request.window.frames) * checkpoint.image_seq_len
        if ids.count(checkpoint.image_token_id) != expected:
            raise ModelError(f"{self.model_id}: the tokenizer splits the image tokens")
        return ids

    def pixel_values(self, window: Window) -> npt.NDArray[np.float32]:
        """``(1, frames, 3, side, side)`` normalized, laid out as mlx-vlm's processor does."""
        checkpoint = self.checkpoint
        width, height = self.input_size
        for frame in window.frames:
            if frame.image.shape != (height, width, 3) or frame.image.dtype != np.uint8:
                raise ValueError(
                    f"frame {frame.index} of {frame.stream!r} is {frame.image.dtype}"
                    f" {frame.image.shape}; the model takes uint8 ({height}, {width}, 3)"
                )
        # Rescaled in float64, normalized in float32: bit for bit what the image processor does.
        pixels = (np.stack([frame.image for frame in window.frames]) * checkpoint.rescale).astype(
            np.float32
        )
        pixels = (pixels - checkpoint.mean) / checkpoint.std
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)[None])

    def next_token_logits(self, request: ScoreRequest) -> npt.NDArray[np.float32]:
        """``(vocab,)`` float32 logits where the score is read (for tests and tools)."""
        logits, _, _ = self._prefill(self.checkpoint, request)
        return _numpy(logits)

    def describe(self) -> str:
        """E.g. ``<model id> via mlx-vlm 0.7.10 (gpu, bfloat16)``."""
        text = f"{self.model_id} via mlx-vlm {mlx_vlm.__version__}"
        if self._checkpoint is None:
            return f"{text} (not loaded)"
        dtype = str(self._checkpoint.model.language_model.norm.weight.dtype).removeprefix(
            "mlx.core."
        )
        return f"{text} ({mx.default_device().type.name}, {dtype})"

    def close(self) -> None:
        """Drop the model and hand its memory back."""
        self._checkpoint = None
        gc.collect()
        mx.clear_cache()

    # --- scoring ----------------------------------------------------------------------------

    def _score_one(self, checkpoint: MlxCheckpoint, request: ScoreRequest) -> Score:
        started = time.perf_counter()
        logits, cache, vision_s = self._prefill(checkpoint, request)
        answer = self._read_score(checkpoint, cache, logits, request)
        prefill_s = time.perf_counter() - started - vision_s
        started = time.perf_counter()
        text = self._generate(checkpoint, cache, logits, answer) if answer.generate else ""
        generate_s = time.perf_counter() - started
        raw = answer.text + text
        significance, description = answer.significance, text
        if answer.free_text:
            parsed = parse_answer(raw, after_prefix=True)
            significance, description = parsed.significance, parsed.description
        frames = request.window.frames
        timings = StageTimings(vision_s, prefill_s, generate_s, 0, len(frames))
        best = best_frame_index(frames)
        return Score(significance, clean_description(description), raw, timings, best)

    def _prefill(
        self, checkpoint: MlxCheckpoint, request: ScoreRequest
    ) -> tuple[mx.array, list[_LayerCache], float]:
        """Logits of the token after the prompt, the filled KV cache, and the vision time."""
        started = time.perf_counter()
        ids = mx.array([self.prompt_ids(request)])
        pixels = mx.array(self.pixel_values(request.window))
        embeds = checkpoint.model.get_input_embeddings(ids, pixels).inputs_embeds
        mx.eval(embeds)
        vision_s = time.perf_counter() - started
        cache: list[_LayerCache] = make_prompt_cache(checkpoint.model.language_model)
        output = checkpoint.model.language_model(ids, inputs_embeds=embeds, cache=cache)
        logits = output.logits[0, -1].astype(mx.float32)
        mx.eval(logits)
        return logits, cache, vision_s

    def _read_score(
        self,
        checkpoint: MlxCheckpoint,
        cache: list[_LayerCache],
        logits: mx.array,
        request: ScoreRequest,
    ) -> _Answer:
        """The most likely complete answer "1".."10" (what the transformers backend picks)."""
        digits = checkpoint.digits
        if digits is None:
            return _Answer("", generate=True, free_text=True)
        p = _softmax(_numpy(logits))[list(digits.digit_ids)].tolist()
        if sum(p[1:]) < self._min_digit_mass:
            return _Answer(digits.lead, generate=True, free_text=True)
        significance = max(range(2, 10), key=p.__getitem__)
        fed_one = False
        if p[1] > p[significance]:  # "10" is "1" then "0": one step more tells 1 from 10
            after_one = _numpy(_forward(checkpoint, [digits.digit_ids[1]], cache))
            p_zero = float(_softmax(after_one)[digits.digit_ids[0]])
            candidates = {10: p[1] * p_zero, 1: p[1] * (1 - p_zero), significance: p[significance]}
            significance = max(candidates, key=candidates.__getitem__)
            fed_one = significance in (1, 10)
            if not fed_one:
                for layer_cache in cache:
                    layer_cache.trim(1)
        text = str(significance)
        answer = _Answer(digits.lead + text, significance)
        answer.feed = [digits.digit_ids[int(c)] for c in (text[1:] if fed_one else text)]
        below = request.describe_below
        if below is None or significance >= below:
            answer.feed += digits.description_ids
            answer.text += DESCRIPTION_PREFIX
            answer.generate = True
        return answer

    def _generate(
        self, checkpoint: MlxCheckpoint, cache: list[_LayerCache], logits: mx.array, answer: _Answer
    ) -> str:
        """Greedy decode after feeding ``answer.feed``; one line unless free text."""
        limit = self._config.max_new_tokens + (FREE_TEXT_EXTRA_TOKENS if answer.free_text else 0)
        if answer.feed:
            logits = _forward(checkpoint, answer.feed, cache)
        tokens: list[int] = []
        while True:
            token = int(mx.argmax(logits).item())
            if token in checkpoint.stop_ids:
                break
            tokens.append(token)
            at_newline = not answer.free_text and token in checkpoint.newline_ids
            if at_newline or len(tokens) >= limit:
                break
            logits = _forward(checkpoint, [token], cache)
        text = checkpoint.tokenizer.decode(tokens, skip_special_tokens=True)
        return text if answer.free_text else text.split("\n", 1)[0]


def _forward(checkpoint: MlxCheckpoint, ids: list[int], cache: list[_LayerCache]) -> mx.array:
    """Feed text tokens after what ``cache`` holds; float32 logits of the next token."""
    output = checkpoint.model.language_model(mx.array([ids]), cache=cache)
    return output.logits[0, -1].astype(mx.float32)


def _numpy(logits: mx.array) -> npt.NDArray[np.float32]:
    return np.asarray(logits, dtype=np.float32)


def _softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    shifted: npt.NDArray[np.float64] = np.exp(logits.astype(np.float64) - logits.max())
    probabilities: npt.NDArray[np.float64] = shifted / shifted.sum()
    return probabilities


def best_frame_index(frames: Sequence[Frame]) -> int:
    """The frame that changed most from its predecessor (as the transformers backend picks it)."""
    if len(frames) <= 1:
        return 0
    stack = np.stack([frame.image[::4, ::4] for frame in frames]).astype(np.int16)
    change = np.abs(np.diff(stack, axis=0)).mean(axis=(1, 2, 3))
    return int(np.argmax(change)) + 1


# --- loading ------------------------------------------------------------------------------------
# find_digit_tokens and best_frame_index repeat transformers_impl's, which imports torch.


def find_digit_tokens(tokenizer: _Tokenizer) -> DigitTokens | None:
    """The lead after which "1".."10" tokenize as one token per digit; None if there is none."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    tail = f"{VideoTokens().end_of_utterance}\nAssistant:{ANSWER_PREFIX}"
    description = encode(DESCRIPTION_PREFIX)
    for lead in (" ", ""):
        base = encode(tail + lead)
        singles = [encode(tail + lead + digit) for digit in "0123456789"]
        if any(ids[:-1] != base or len(ids) != len(base) + 1 for ids in singles):
            continue
        digit_ids = tuple(ids[-1] for ids in singles)
        if all(
            encode(tail + lead + str(score) + DESCRIPTION_PREFIX)
            == base + [digit_ids[int(c)] for c in str(score)] + description
            for score in range(1, 11)
        ):
            return DigitTokens(lead, digit_ids, tuple(description))
    return None


def load_checkpoint(config: ModelConfig) -> MlxCheckpoint:
    """Load model, tokenizer and image settings; every failure is one ``ModelError`` line."""
    directory = local_directory(config.id)
    model_config = _read_json(directory / "config.json")
    if model_config.get("model_type") != "smolvlm":
        raise ModelError(
            f"{config.id} is a {model_config.get('model_type')!r} checkpoint, not SmolVLM2:"
            f" set model.id to a SmolVLM2 checkpoint such as {DEFAULT_MODEL_ID}"
        )
    try:
        model, processor = mlx_vlm.load(str(directory))
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load {config.id} with mlx-vlm {mlx_vlm.__version__}: {line}"
        ) from exc
    if config.dtype != "auto":
        model.set_dtype(getattr(mx, config.dtype))
    vision = model.config.vision_config
    image_seq_len = (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2
    images = processor.image_processor
    side = int(
        (getattr(images, "max_image_size", None) or {}).get("longest_edge", vision.image_size)
    )
    declared = _read_json(directory / "processor_config.json").get("image_seq_len")
    if side != vision.image_size or declared not in (None, image_seq_len):
        raise ModelError(
            f"{config.id} is inconsistent: frames of {side}px and {declared} image tokens in the"
            f" processor config, {vision.image_size}px and {image_seq_len} in the model config"
        )
    tokenizer: _Tokenizer = processor.tokenizer
    image_token_id = int(model.config.image_token_index)
    _check_special_tokens(config.id, tokenizer, image_token_id)
    rescale, mean, std = _normalization(config.id, images)
    stop: set[object] = {
        tokenizer.convert_tokens_to_ids(VideoTokens().end_of_utterance),
        tokenizer.eos_token_id,
    }
    for source in (
        model.config.eos_token_id,
        _read_json(directory / "generation_config.json").get("eos_token_id"),
    ):
        stop.update(source if isinstance(source, list) else [source])
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return MlxCheckpoint(
        model=model,
        tokenizer=tokenizer,
        image_side=side,
        image_seq_len=image_seq_len,
        image_token_id=image_token_id,
        rescale=rescale,
        mean=mean,
        std=std,
        digits=find_digit_tokens(tokenizer),
        stop_ids=frozenset(i for i in stop if isinstance(i, int)),
        newline_ids=frozenset(i for i, text in enumerate(texts) if "\n" in text),
    )


def local_directory(model_id: str) -> Path:
    """The checkpoint directory: ``model_id`` itself, else its Hugging Face snapshot."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{model_id} has no config.json: set model.id to a SmolVLM2 checkpoint"
            )
        return path
    if path.exists() or not _HUB_ID_RE.match(model_id):
        raise ModelError(
            f"model directory {model_id} does not exist: set model.id to a SmolVLM2 checkpoint"
            f" directory or a hub id such as {DEFAULT_MODEL_ID}"
        )
    hint = (
        f"download it where the hub is reachable (`hf download {model_id} --local-dir DIR`),"
        " copy DIR here and set model.id to it"
    )
    try:
        return Path(
            huggingface_hub.snapshot_download(
                model_id, allow_patterns=_HUB_FILES, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        if huggingface_hub.is_offline_mode():
            raise ModelError(
                f"{model_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}"
            ) from None
    try:
        return Path(huggingface_hub.snapshot_download(model_id, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"{model_id} is not on the Hugging Face hub (or needs a login): check model.id"
        ) from exc
    except Exception as exc:
        raise ModelError(f"cannot download {model_id}: {type(exc).__name__}; {hint}") from exc


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _normalization(
    model_id: str, images: object
) -> tuple[float, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``x * rescale``, then ``(x - mean) / std``, from the image processor's settings."""
    rescale = float(getattr(images, "rescale_factor", None) or 1 / 255)
    if getattr(images, "do_rescale", None) is False:
        rescale = 1.0
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    if getattr(images, "do_normalize", None) is not False:
        mean = np.broadcast_to(np.asarray(getattr(images, "image_mean", 0.5), np.float32), 3).copy()
        std = np.broadcast_to(np.asarray(getattr(images, "image_std", 0.5), np.float32), 3).copy()
    # mlx-vlm drops all-zero pixel values as batch padding: a frame of one colour must not be 0.
    levels = (np.arange(256, dtype=np.float32)[:, None] * np.float32(rescale) - mean) / std
    if (levels == 0).any(axis=0).all():
        raise ModelError(
            f"{model_id}: its image normalization maps a plain frame to zeros, which mlx-vlm drops"
        )
    return rescale, mean, std


def _check_special_tokens(model_id: str, tokenizer: _Tokenizer, image_token_id: int) -> None:
    tokens = VideoTokens()
    for text in (tokens.bos, tokens.image, tokens.fake_around_image, tokens.global_image):
        if len(tokenizer.encode(text, add_special_tokens=False)) != 1:
            raise ModelError(f"{model_id}: the tokenizer lacks SmolVLM2's {text} token")
    if tokenizer.convert_tokens_to_ids(tokens.image) != image_token_id:
        raise ModelError(f"{model_id}: tokenizer and model disagree on the id of {tokens.image}")
