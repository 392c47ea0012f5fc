"""SmolVLM2 on transformers: per-frame vision cache, batched prefill, scores read from logits."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamd.config import ModelConfig
from streamd.domain import Score, ScoreRequest, StageTimings
from streamd.errors import ModelError
from streamd.scoring.smolvlm import checkpoint as smolvlm
from streamd.scoring.smolvlm.checkpoint import DEFAULT_MIN_DIGIT_MASS, WARM_UP_STREAM, DigitTokens
from streamd.scoring.smolvlm.reader import Answer, AnswerReader
from streamd.scoring.smolvlm.vision_cache import (
    DEFAULT_CAPACITY_FRAMES,
    FrameEncoder,
    FrameFeatureCache,
)
from streamd.scoring.transformers_checkpoint import Checkpoint, load_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 4


@dataclass(slots=True)
class _DecodeState:
    """KV cache and per-row bookkeeping of one ``score`` call's batch (left-padded rows)."""

    cache: object
    mask: torch.Tensor
    """``(rows, tokens so far)``, 1 for real tokens, 0 for padding (also mid-sequence)."""
    next_position: torch.Tensor
    """``(rows,)``: position id of each row's next real token."""
    logits: torch.Tensor
    """``(rows, vocab)`` float32 logits of each row's next token."""


class TransformersBackend:
    """SmolVLM2 on torch (CUDA, MPS or CPU); see ``streamd.scoring.base.ScoringBackend``.

    Each frame goes through the vision encoder once: its features are cached by
    ``(stream, frame.index)`` and scattered into every overlapping window's prompt. The score
    is read from the next-token probabilities of the digit tokens right after the answer
    prefix; only the description is generated.

    Args:
        config: Model id, device, dtype and description length.
        max_batch: Most windows per ``score`` call.
        min_digit_mass: See ``DEFAULT_MIN_DIGIT_MASS``.
        cache_capacity: Hard cap of cached frames (all streams).
    """

    name = "transformers"

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        min_digit_mass: float = DEFAULT_MIN_DIGIT_MASS,
        cache_capacity: int = DEFAULT_CAPACITY_FRAMES,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.model_id = config.id
        self._config = config
        self._max_batch = max_batch
        self._min_digit_mass = min_digit_mass
        self.cache = FrameFeatureCache(cache_capacity)
        self._checkpoint: Checkpoint | None = None
        self._reader: AnswerReader | None = None
        self._encoder: FrameEncoder | None = None

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
        checkpoint = load_checkpoint(self._config)
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
        return f"{self.model_id} on {self._checkpoint.device} ({dtype})"

    def close(self) -> None:
        """Drop the model and the cached features, and hand the memory back."""
        device = self._checkpoint.device if self._checkpoint else None
        self._checkpoint = None
        self._reader = None
        self._encoder = None
        self.cache.clear()
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
    ) -> _DecodeState:
        prompts = [checkpoint.encode(self.prompt_text(request)) for request in requests]
        for prompt, frame_features in zip(prompts, features, strict=True):
            # masked_scatter would quietly take the first rows of too many features.
            if prompt.count(checkpoint.image_token_id) != len(frame_features):
                raise ModelError(f"{self.model_id}: image tokens and vision features disagree")
        width = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), width), checkpoint.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row ends where it reads
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(checkpoint.device), mask.to(checkpoint.device)
        embeds = checkpoint.model.get_input_embeddings()(ids)
        if any(len(frame_features) for frame_features in features):
            image_slots = (ids == checkpoint.image_token_id).unsqueeze(-1)
            image_rows = torch.cat([f for f in features if len(f)]).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_slots, image_rows)
        # As generate() does for left padding: real tokens count from 0, padding sits at 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        output = checkpoint.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        return _DecodeState(output.cache, mask, mask.sum(-1), output.logits[:, -1].float())

    def _extend(self, checkpoint: Checkpoint, state: _DecodeState, feeds: list[list[int]]) -> None:
        """Append each row's tokens (rows may get none), right-aligned so each ends last."""
        width = max(len(feed) for feed in feeds)
        if width == 0:
            return
        ids = torch.full((len(feeds), width), checkpoint.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(feeds), width), dtype=torch.long)
        for row, feed in enumerate(feeds):
            if feed:
                ids[row, width - len(feed) :] = torch.tensor(feed)
                valid[row, width - len(feed) :] = 1
        ids, valid = ids.to(checkpoint.device), valid.to(checkpoint.device)
        positions = (state.next_position[:, None] + valid.cumsum(-1) - 1).clamp(min=0)
        state.mask = torch.cat([state.mask, valid], dim=-1)
        output = checkpoint.model(
            input_ids=ids,
            attention_mask=state.mask,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state.cache = output.cache
        fed = valid[:, -1].bool().unsqueeze(-1)
        state.logits = torch.where(fed, output.logits[:, -1].float(), state.logits)
        state.next_position = state.next_position + valid.sum(-1)

    def _read_scores(
        self, checkpoint: Checkpoint, state: _DecodeState, requests: Sequence[ScoreRequest]
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
            self._extend(checkpoint, state, [[digits.digit_ids[1]] if c else [] for c in check])
            p_zero = state.logits.softmax(-1)[:, digits.digit_ids[0]].tolist()
            for row, answer in enumerate(answers):
                if check[row]:
                    keeps_one[row] = answers_of.settle(answer, probs[row], p_zero[row])
                    if not keeps_one[row]:
                        _hide_one(state, row)
        for row, (answer, request) in enumerate(zip(answers, requests, strict=True)):
            answers_of.finish(answer, keeps_one[row], request.describe_below)
        return answers

    def _generate(
        self, checkpoint: Checkpoint, state: _DecodeState, answers: list[Answer]
    ) -> tuple[list[str], list[int]]:
        """Greedy decode of every row that wants text, each stopping on its own.

        Returns:
            Each row's decoded text and how many tokens it generated.
        """
        if not any(answer.generate for answer in answers):
            return ["" for _ in answers], [0 for _ in answers]
        self._extend(checkpoint, state, [a.feed if a.generate else [] for a in answers])
        answers_of = self._answer_reader()
        limits = [answers_of.limit(answer) for answer in answers]
        active = [answer.generate for answer in answers]
        tokens: list[list[int]] = [[] for _ in answers]
        while any(active):
            choices = state.logits.argmax(-1).tolist()
            for row, token in enumerate(choices):
                if active[row]:
                    active[row] = answers_of.take(answers[row], tokens[row], token, limits[row])
            if any(active):
                feeds = [[tokens[row][-1]] if active[row] else [] for row in range(len(answers))]
                self._extend(checkpoint, state, feeds)
        texts: list[str] = checkpoint.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return texts, [len(row) for row in tokens]

    # --- plumbing ---------------------------------------------------------------------------

    def _loaded(self) -> Checkpoint:
        return smolvlm.loaded(self._checkpoint, self.model_id)

    def _answer_reader(self) -> AnswerReader:
        return smolvlm.loaded(self._reader, self.model_id)


def _hide_one(state: _DecodeState, row: int) -> None:
    """Hide the "1" fed to tell 1 from 10: masked out for good, its position id reused."""
    state.mask[row, -1] = 0
    state.next_position[row] -= 1
