"""SmolVLM2 on transformers: per-frame vision cache, batched prefill, scores read from logits."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence

import torch

from streamd.config import ModelConfig
from streamd.domain import Frame, Score, ScoreRequest, StageTimings
from streamd.errors import ModelError
from streamd.scoring.smolvlm import checkpoint as smolvlm
from streamd.scoring.smolvlm.checkpoint import (
    DEFAULT_MIN_DIGIT_MASS,
    FREE_TEXT_EXTRA_TOKENS,
    WARM_UP_STREAM,
    DigitTokens,
)
from streamd.scoring.smolvlm.reader import Answer, AnswerReader
from streamd.scoring.smolvlm.vision_cache import (
    DEFAULT_CAPACITY_FRAMES,
    FrameEncoder,
    FrameFeatureCache,
)
from streamd.scoring.torch_cpu import configure_threads
from streamd.scoring.transformers_checkpoint import Checkpoint, load_checkpoint
from streamd.scoring.transformers_decode import DecodeState, RowPlan, TextDecoder
from streamd.scoring.transformers_kv import DEFAULT_PREFIX_ENTRIES, PrefixCache
from streamd.scoring.vision_quantize import apply_vision_quantize

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 4
ANSWER_TOKENS = 16
"""KV columns reserved for the answer's own tokens (digits, "Description:") before the text."""


class TransformersBackend:
    """SmolVLM2 on torch (CUDA, MPS or CPU); see ``streamd.scoring.base.ScoringBackend``.

    Each frame goes through the vision encoder once: its features are cached by
    ``(stream, frame.index)`` and scattered into every overlapping window's prompt. The score
    is read from the next-token probabilities of the digit tokens right after the answer
    prefix; only the description is generated. The text before the first frame (system
    prompt, preamble) is the same for every window of a stream: its KV is kept by exact token
    ids (``PrefixCache``) and only the rest of each prompt is prefilled.

    Args:
        config: Model id, device, dtype and description length.
        max_batch: Most windows per ``score`` call.
        min_digit_mass: See ``DEFAULT_MIN_DIGIT_MASS``.
        cache_capacity: Hard cap of cached frames (all streams).
        prefix_entries: Text prefixes whose KV is kept; 0 prefills every prompt in full.
    """

    name = "transformers"

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        min_digit_mass: float = DEFAULT_MIN_DIGIT_MASS,
        cache_capacity: int = DEFAULT_CAPACITY_FRAMES,
        prefix_entries: int = DEFAULT_PREFIX_ENTRIES,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.model_id = config.id
        self._config = config
        self._max_batch = max_batch
        self._min_digit_mass = min_digit_mass
        self.cache = FrameFeatureCache(cache_capacity)
        self.prefix_cache = PrefixCache(prefix_entries) if prefix_entries else None
        self._checkpoint: Checkpoint | None = None
        self._decoder: TextDecoder | None = None
        self._reader: AnswerReader | None = None
        self._encoder: FrameEncoder | None = None
        self.threads = 0
        """torch's CPU threads, once loaded."""

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames: the vision encoder's square input."""
        side = self._loaded().image_side
        return side, side

    @property
    def max_in_flight(self) -> int:
        """One call at a time, on the model thread."""
        return 1

    @property
    def max_batch(self) -> int:
        """Most windows one ``score`` call takes."""
        return self._max_batch

    @property
    def digit_tokens(self) -> DigitTokens | None:
        """How scores are read from logits; None when the tokenizer forces free text."""
        return self._loaded().digits

    @property
    def checkpoint(self) -> Checkpoint:
        """The loaded model, tokenizer and settings (for tests and tools)."""
        return self._loaded()

    @property
    def frame_encoder(self) -> FrameEncoder:
        """The cached vision path (for tests and tools)."""
        return smolvlm.loaded(self._encoder, self.model_id)

    def load(self) -> None:
        """Load the checkpoint; raises ``ModelError`` with one line naming the model and a fix."""
        self.threads = configure_threads(self._config.threads)
        checkpoint = load_checkpoint(self._config)
        apply_vision_quantize(checkpoint, self._config.vision_quantize)
        self._checkpoint = checkpoint
        self._reader = AnswerReader.of(
            checkpoint, self._min_digit_mass, self._config.max_new_tokens
        )
        self._encoder = FrameEncoder(
            checkpoint.model.model.get_image_features,
            checkpoint.normalization,
            checkpoint.device,
            checkpoint.dtype,
            self.cache,
            checkpoint.synchronize,
        )
        reserve = self._config.max_new_tokens + FREE_TEXT_EXTRA_TOKENS + ANSWER_TOKENS
        self._decoder = TextDecoder(checkpoint, reserve, self.prefix_cache)
        mode = (
            f"digit logits after {checkpoint.digits.lead!r}" if checkpoint.digits else "free text"
        )
        logger.info(
            "loaded %s: %d image tokens per frame, score from %s",
            self.describe(),
            checkpoint.image_seq_len,
            mode,
        )

    def warm_up(self) -> None:
        """Score one throwaway 2-frame window: the first real one then pays no one-off cost."""
        self.score([smolvlm.warm_up_request(*self.input_size)])
        self.cache.discard_stream(WARM_UP_STREAM)
        if self.prefix_cache is not None:  # a 2-frame window's preamble: no real one has it
            self.prefix_cache.clear()

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score up to ``max_batch`` windows in one batch; one ``Score`` per request, in order.

        ``StageTimings`` holds each stage's wall time for the whole batch: what every window
        of it waited for.
        """
        if len(requests) > self._max_batch:
            raise ValueError(f"{len(requests)} requests exceed max_batch={self._max_batch}")
        if not requests:
            return []
        checkpoint = self._loaded()
        for request in requests:
            smolvlm.check_frames(request.window, *self.input_size)
        try:
            with torch.inference_mode():
                return self._score(checkpoint, requests)
        except torch.OutOfMemoryError as exc:
            raise ModelError(
                f"out of memory scoring {len(requests)} window(s) with {self.model_id} on "
                f"{checkpoint.device}: lower the batch, sample fewer frames, or use a bigger device"
            ) from exc
        except RuntimeError as exc:  # torch reports device and kernel failures as RuntimeError
            raise ModelError(
                f"scoring failed on {checkpoint.device}: {smolvlm.first_line(exc)}"
            ) from exc

    @property
    def encodes_ahead(self) -> bool:
        """Frames can be encoded before their windows: the vision cache keeps them."""
        return True

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        """Run the vision encoder on ``frames`` not cached yet, in one batch (any streams)."""
        self._loaded()
        return self.frame_encoder.encode_ahead(frames)

    def prompt_text(self, request: ScoreRequest) -> str:
        """The exact text the model reads for ``request``, up to where the score is read."""
        checkpoint = self._loaded()
        return smolvlm.prompt_text(
            request, checkpoint.image_seq_len, checkpoint.digits, checkpoint.video_tokens
        )

    def next_token_logits(self, requests: Sequence[ScoreRequest]) -> torch.Tensor:
        """``(len(requests), vocab)`` float32 logits where the score is read (for tests, tools)."""
        checkpoint = self._loaded()
        with torch.inference_mode():
            encoded = self.frame_encoder.encode([request.window for request in requests])
            state = self._prefill(checkpoint, requests, encoded.features)
        return state.logits

    def describe(self) -> str:
        """E.g. ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct on cpu (bfloat16)``."""
        if self._checkpoint is None:
            return f"{self.model_id} (not loaded)"
        dtype = str(self._checkpoint.dtype).removeprefix("torch.")
        device = self._checkpoint.device
        threads = f", {self.threads} threads" if device.type == "cpu" else ""
        return f"{self.model_id} on {device} ({dtype}{threads})"

    def close(self) -> None:
        """Drop the model and the cached features, and hand the memory back."""
        device = self._checkpoint.device if self._checkpoint else None
        self._checkpoint = None
        self._reader = None
        self._encoder = None
        self._decoder = None
        self.cache.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        gc.collect()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
        elif device is not None and device.type == "mps":
            torch.mps.empty_cache()

    # --- scoring ----------------------------------------------------------------------------

    def _score(self, checkpoint: Checkpoint, requests: Sequence[ScoreRequest]) -> list[Score]:
        encoded = self.frame_encoder.encode([request.window for request in requests])
        started = time.perf_counter()
        state = self._prefill(checkpoint, requests, encoded.features)
        answers = self._read_scores(checkpoint, state, requests)
        checkpoint.synchronize()
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        generated, counts = self._generate(checkpoint, state, answers)
        generate_s = time.perf_counter() - started
        scores = []
        for i, (request, answer, text) in enumerate(zip(requests, answers, generated, strict=True)):
            significance, description, raw = self._answer_reader().read(answer, text)
            timings = StageTimings(
                encoded.seconds,
                prefill_s,
                generate_s,
                encoded.hits[i],
                encoded.misses[i],
                completion_tokens=counts[i],
            )
            best = smolvlm.best_frame_index(request.window.frames)
            scores.append(Score(significance, description, raw, timings, best))
        return scores

    def _prefill(
        self, checkpoint: Checkpoint, requests: Sequence[ScoreRequest], features: list[torch.Tensor]
    ) -> DecodeState:
        prompts = [checkpoint.encode(self.prompt_text(request)) for request in requests]
        for prompt, frame_features in zip(prompts, features, strict=True):
            # masked_scatter would quietly take the first rows of too many features.
            if prompt.count(checkpoint.image_token_id) != len(frame_features):
                raise ModelError(f"{self.model_id}: image tokens and vision features disagree")
        return self._text_decoder().prefill(prompts, features)

    def _read_scores(
        self, checkpoint: Checkpoint, state: DecodeState, requests: Sequence[ScoreRequest]
    ) -> list[Answer]:
        """Pick each row's most likely complete answer, "1" to "10", from the digit logits."""
        answers_of = self._answer_reader()
        digits = checkpoint.digits
        if digits is None:
            return [answers_of.start(None) for _ in requests]
        probs = state.logits.softmax(-1)[:, list(digits.digit_ids)].tolist()
        answers = [answers_of.start(p) for p in probs]
        # "10" is "1" then "0": only when "1" beats every other first digit does one extra step
        # tell 1 from 10, and both may still lose to that digit (P(1) = P(10) + P(1, not 0)).
        check = [answers_of.wants_one_or_ten(a, p) for a, p in zip(answers, probs, strict=True)]
        keeps_one = [False] * len(answers)
        if any(check):
            self._text_decoder().extend(state, [[digits.digit_ids[1]] if c else [] for c in check])
            p_zero = state.logits.softmax(-1)[:, digits.digit_ids[0]].tolist()
            for row, answer in enumerate(answers):
                if check[row]:
                    keeps_one[row] = answers_of.settle(answer, probs[row], p_zero[row])
                    if not keeps_one[row]:  # masked out for good, its position id reused
                        state.hide_last(row)
        for row, (answer, request) in enumerate(zip(answers, requests, strict=True)):
            answers_of.finish(answer, keeps_one[row], request.describe_threshold())
        return answers

    def _generate(
        self, checkpoint: Checkpoint, state: DecodeState, answers: list[Answer]
    ) -> tuple[list[str], list[int]]:
        """Greedy decode of every row that wants text, each stopping on its own.

        Returns:
            Each row's decoded text and how many tokens it generated.
        """
        if not any(answer.generate for answer in answers):
            return ["" for _ in answers], [0 for _ in answers]
        decoder = self._text_decoder()
        decoder.extend(state, [a.feed if a.generate else [] for a in answers])
        answers_of = self._answer_reader()
        plans = [
            RowPlan(answers_of.limit(a) if a.generate else 0, one_line=not a.free_text)
            for a in answers
        ]
        tokens: list[list[int]] = [[] for _ in answers]
        for answer, plan, row, kept in zip(
            answers, plans, decoder.greedy(state, plans), tokens, strict=True
        ):
            for token in row:  # where each row stopped: what the reader keeps of it
                if not answers_of.take(answer, kept, token, plan.limit):
                    break
        texts: list[str] = checkpoint.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return texts, [len(row) for row in tokens]

    # --- plumbing ---------------------------------------------------------------------------

    def _loaded(self) -> Checkpoint:
        return smolvlm.loaded(self._checkpoint, self.model_id)

    def _answer_reader(self) -> AnswerReader:
        return smolvlm.loaded(self._reader, self.model_id)

    def _text_decoder(self) -> TextDecoder:
        return smolvlm.loaded(self._decoder, self.model_id)
