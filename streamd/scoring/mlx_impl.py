"""SmolVLM2 on mlx-vlm (Apple Silicon): the score read from the digit logits, then a description."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import mlx.core as mx
import mlx_vlm
import numpy as np
import numpy.typing as npt
from mlx_vlm.models.cache import make_prompt_cache

from streamd.config import ModelConfig
from streamd.domain import Score, ScoreRequest, StageTimings, Window
from streamd.errors import ModelError
from streamd.scoring.base import NothingAhead
from streamd.scoring.mlx_checkpoint import MlxCheckpoint, load_checkpoint
from streamd.scoring.prompt import clean_description
from streamd.scoring.smolvlm import checkpoint as smolvlm
from streamd.scoring.smolvlm.checkpoint import DEFAULT_MIN_DIGIT_MASS
from streamd.scoring.smolvlm.reader import Answer, AnswerReader

logger = logging.getLogger(__name__)

TESTED_MLX_VLM = "0.7.10"
"""The release this module was written against (pinned in the ``mlx`` extra): it reaches past
``mlx_vlm.generate`` into ``Model.get_input_embeddings``, ``language_model`` and the KV cache,
which move between releases."""


class _LayerCache(Protocol):
    """One layer's KV cache (``mlx_vlm.models.cache.KVCache``)."""

    def trim(self, n: int) -> int: ...


class MlxBackend(NothingAhead):
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
        self._reader: AnswerReader | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)``: the vision encoder's square input."""
        side = self.checkpoint.image_side
        return side, side

    @property
    def max_in_flight(self) -> int:
        """One call at a time, on the model thread."""
        return 1

    @property
    def max_batch(self) -> int:
        """One window per ``score`` call."""
        return 1

    @property
    def checkpoint(self) -> MlxCheckpoint:
        """The loaded model and its facts; ``ModelError`` before ``load``."""
        return smolvlm.loaded(self._checkpoint, self.model_id)

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
        self._reader = AnswerReader.of(
            self._checkpoint, self._min_digit_mass, self._config.max_new_tokens
        )
        mode = (
            f"digit logits after {self._checkpoint.digits.lead!r}"
            if self._checkpoint.digits
            else "free text"
        )
        logger.info("loaded %s, score from %s", self.describe(), mode)

    def warm_up(self) -> None:
        """Score one throwaway 2-frame window: the first real one then pays no one-off cost."""
        self.score([smolvlm.warm_up_request(*self.input_size)])

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score at most one window; one ``Score`` per request."""
        if len(requests) > self.max_batch:
            raise ValueError(f"{len(requests)} requests exceed max_batch={self.max_batch}")
        checkpoint = self.checkpoint
        try:
            return [self._score_one(checkpoint, request) for request in requests]
        except RuntimeError as exc:  # mlx reports allocation and kernel failures this way
            raise ModelError(
                f"mlx failed scoring with {self.model_id}: {smolvlm.first_line(exc)}"
            ) from exc

    def prompt_text(self, request: ScoreRequest) -> str:
        """The exact text the model reads for ``request``, up to where the score is read."""
        checkpoint = self.checkpoint
        return smolvlm.prompt_text(request, checkpoint.image_seq_len, checkpoint.digits)

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
        normalization = self.checkpoint.normalization
        smolvlm.check_frames(window, *self.input_size)
        # Rescaled in float64, normalized in float32: bit for bit what the image processor does.
        stack = np.stack([frame.image for frame in window.frames])
        mean: npt.NDArray[np.float32] = np.asarray(normalization.mean, dtype=np.float32)
        std: npt.NDArray[np.float32] = np.asarray(normalization.std, dtype=np.float32)
        pixels = ((stack * normalization.rescale_factor).astype(np.float32) - mean) / std
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
        self._reader = None
        gc.collect()
        mx.clear_cache()

    # --- scoring ----------------------------------------------------------------------------

    def _score_one(self, checkpoint: MlxCheckpoint, request: ScoreRequest) -> Score:
        started = time.perf_counter()
        logits, cache, vision_s = self._prefill(checkpoint, request)
        answer = self._read_score(checkpoint, cache, logits, request)
        prefill_s = time.perf_counter() - started - vision_s
        started = time.perf_counter()
        text, count = (
            self._generate(checkpoint, cache, logits, answer) if answer.generate else ("", 0)
        )
        generate_s = time.perf_counter() - started
        significance, description, raw = smolvlm.loaded(self._reader, self.model_id).read(
            answer, text
        )
        if answer.free_text:  # parsed descriptions are cleaned once more (JSON ones at all)
            description = clean_description(description)
        frames = request.window.frames
        timings = StageTimings(
            vision_s, prefill_s, generate_s, 0, len(frames), completion_tokens=count
        )
        best = smolvlm.best_frame_index(frames)
        return Score(significance, description, raw, timings, best)

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
    ) -> Answer:
        """The most likely complete answer "1".."10" (what the transformers backend picks)."""
        answers_of = smolvlm.loaded(self._reader, self.model_id)
        digits = checkpoint.digits
        if digits is None:
            return answers_of.start(None)
        p = _softmax(_numpy(logits))[list(digits.digit_ids)].tolist()
        answer = answers_of.start(p)
        if answer.free_text:
            return answer
        fed_one = False
        # "10" is "1" then "0": one step more tells 1 from 10
        if answers_of.wants_one_or_ten(answer, p):
            after_one = _numpy(_forward(checkpoint, [digits.digit_ids[1]], cache))
            p_zero = float(_softmax(after_one)[digits.digit_ids[0]])
            fed_one = answers_of.settle(answer, p, p_zero)
            if not fed_one:
                for layer_cache in cache:
                    layer_cache.trim(1)
        answers_of.finish(answer, fed_one, request.describe_threshold())
        return answer

    def _generate(
        self,
        checkpoint: MlxCheckpoint,
        cache: list[_LayerCache],
        logits: mx.array,
        answer: Answer,
    ) -> tuple[str, int]:
        """Greedy decode after feeding ``answer.feed``: the text and how many tokens it took."""
        answers_of = smolvlm.loaded(self._reader, self.model_id)
        limit = answers_of.limit(answer)
        if answer.feed:
            logits = _forward(checkpoint, answer.feed, cache)
        tokens: list[int] = []
        while answers_of.take(answer, tokens, int(mx.argmax(logits).item()), limit):
            logits = _forward(checkpoint, [tokens[-1]], cache)
        text: str = checkpoint.tokenizer.decode(tokens, skip_special_tokens=True)
        return text, len(tokens)


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
