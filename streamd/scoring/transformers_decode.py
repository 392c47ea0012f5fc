"""SmolVLM2's text model over left-padded rows: prefill, extend, greedy decode (torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

from streamd.scoring.transformers_checkpoint import Checkpoint
from streamd.scoring.transformers_kv import (
    PrefixCache,
    PrefixKey,
    copy_prefix,
    load_prefixes,
    reserved_cache,
)

MIN_PREFIX_TOKENS = 16
"""A shorter text prefix is not worth a cache entry."""
DEFAULT_CHECK_EVERY = 1
"""Decode steps between checks that every row is done. Each check is one host sync; on CPU it
costs nothing measurable, and every step run past the end costs a whole token (bench/decode.py)."""


@dataclass(slots=True)
class DecodeState:
    """KV cache and per-row bookkeeping of one batch of left-padded rows."""

    cache: Cache
    mask: torch.Tensor
    """``(rows, reserved columns)``: 1 for real tokens, 0 for padding (also mid-sequence) and
    for the columns not used yet."""
    length: int
    """Columns in use, in the mask and in every cache layer."""
    next_position: torch.Tensor
    """``(rows,)``: position id of each row's next real token."""
    logits: torch.Tensor
    """``(rows, vocab)`` float32 logits of each row's next token."""

    def attention_mask(self) -> torch.Tensor:
        """The mask of the columns in use."""
        return self.mask[:, : self.length]

    def append(self, valid: torch.Tensor) -> None:
        """Append columns of ``valid`` (``(rows, n)``, 1 for real tokens) to the mask."""
        end = self.length + valid.shape[1]
        if end > self.mask.shape[1]:
            grown = self.mask.new_zeros((self.mask.shape[0], max(2 * self.mask.shape[1], end)))
            grown[:, : self.length] = self.attention_mask()
            self.mask = grown
        self.mask[:, self.length : end] = valid
        self.length = end

    def hide_last(self, row: int) -> None:
        """Hide ``row``'s last token for good; its position id is reused."""
        self.mask[row, self.length - 1] = 0
        self.next_position[row] -= 1


@dataclass(frozen=True, slots=True)
class RowPlan:
    """How far one row may decode."""

    limit: int
    """Most tokens it may generate; 0: none."""
    one_line: bool
    """A newline ends it (a description); free text goes on."""


class TextDecoder:
    """Runs the text model of a loaded checkpoint for ``TransformersBackend``.

    Args:
        checkpoint: The loaded model and its token facts.
        reserve: KV columns to reserve beyond the prompt (what is decoded after it); None
            grows transformers' ``DynamicCache`` by concatenation instead (for comparison).
        prefixes: Where the KV of prompts' text prefixes is kept; None computes them each time.
        check_every: See ``DEFAULT_CHECK_EVERY``.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        reserve: int | None,
        prefixes: PrefixCache | None = None,
        check_every: int = DEFAULT_CHECK_EVERY,
    ) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, not {check_every}")
        self._checkpoint = checkpoint
        self._reserve = reserve
        self.prefixes = prefixes
        self._check_every = check_every
        self._layers = int(checkpoint.model.config.get_text_config().num_hidden_layers)
        device = checkpoint.device
        self._stops = torch.tensor(sorted(checkpoint.stop_ids), dtype=torch.long, device=device)
        self._newlines = torch.tensor(
            sorted(checkpoint.newline_ids), dtype=torch.long, device=device
        )

    def prefill(
        self, prompts: Sequence[list[int]], features: Sequence[torch.Tensor]
    ) -> DecodeState:
        """Run every prompt, its image tokens replaced by its frames' features.

        Each row's text prefix (the tokens before its first image token) comes from the
        prefix cache when it holds those exact ids, and only the rest is computed after it;
        otherwise the whole prompt is, and its prefix is kept from there (so a stream's first
        window is computed exactly as without the cache). Rows are left-padded:
        ``[padding][cached prefix][padding][rest]``, so every row ends where it reads. Each
        prompt must hold as many image tokens as its ``features`` have rows.
        """
        checkpoint = self._checkpoint
        keys = [self._prefix_key(prompt) for prompt in prompts]
        kvs = [self._cached_prefix(key) for key in keys]
        splits = [len(key) if kv is not None else 0 for key, kv in zip(keys, kvs, strict=True)]
        rests = [prompt[n:] for prompt, n in zip(prompts, splits, strict=True)]
        head, width = max(splits), max(len(rest) for rest in rests)
        state = self._empty_state(len(prompts), head + width)
        if head:
            load_prefixes(state.cache, kvs, head)
            cached = torch.zeros((len(prompts), head), dtype=torch.long)
            for row, n in enumerate(splits):
                cached[row, head - n :] = 1
            state.append(cached.to(checkpoint.device))
        ids, valid = _right_aligned(rests, width, checkpoint.pad_token_id)
        ids, valid = ids.to(checkpoint.device), valid.to(checkpoint.device)
        embeds = checkpoint.model.get_input_embeddings()(ids)
        if any(len(frame_features) for frame_features in features):
            image_slots = (ids == checkpoint.image_token_id).unsqueeze(-1)
            image_rows = torch.cat([f for f in features if len(f)]).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_slots, image_rows)
        start = torch.tensor(splits, device=checkpoint.device)
        # As generate() does for left padding: real tokens count from 0, padding sits at 1.
        positions = (start[:, None] + valid.cumsum(-1) - 1).masked_fill(valid == 0, 1)
        state.append(valid)
        output = checkpoint.model(
            inputs_embeds=embeds,
            attention_mask=state.attention_mask(),
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state.next_position = start + valid.sum(-1)
        state.logits = output.logits[:, -1].float()
        for row, (key, kv) in enumerate(zip(keys, kvs, strict=True)):
            if self.prefixes is not None and key and kv is None and key not in self.prefixes:
                first = head + width - len(rests[row])  # where the row's whole prompt starts
                self.prefixes.put(key, copy_prefix(state.cache, row, first, len(key)))
        return state

    def extend(self, state: DecodeState, feeds: Sequence[list[int]]) -> None:
        """Append each row's tokens (rows may get none), right-aligned so each ends last."""
        width = max(len(feed) for feed in feeds)
        if width == 0:
            return
        checkpoint = self._checkpoint
        ids, valid = _right_aligned(feeds, width, checkpoint.pad_token_id)
        ids, valid = ids.to(checkpoint.device), valid.to(checkpoint.device)
        positions = (state.next_position[:, None] + valid.cumsum(-1) - 1).clamp(min=0)
        state.append(valid)
        logits = self._forward(state, ids, positions)
        fed = valid[:, -1].bool().unsqueeze(-1)
        state.logits = torch.where(fed, logits, state.logits)
        state.next_position = state.next_position + valid.sum(-1)

    def greedy(self, state: DecodeState, plans: Sequence[RowPlan]) -> list[list[int]]:
        """Greedy tokens of every row, one step for all rows at a time, until all are done.

        Rows that are done (or generate nothing) are fed too: that costs nothing the batch
        does not already pay, and no row sees another. The argmax stays on the device; the
        only host sync is the "all done?" check. Every row's tokens come back, also past where
        it stopped (at most ``limit``): the caller cuts them (``AnswerReader.take``).
        """
        steps = max(plan.limit for plan in plans)
        if steps == 0:
            return [[] for _ in plans]
        device = state.logits.device
        limits = torch.tensor([plan.limit for plan in plans], device=device)
        one_line = torch.tensor([plan.one_line for plan in plans], device=device)
        done = limits == 0
        tokens = torch.empty((len(plans), steps), dtype=torch.long, device=device)
        token = state.logits.argmax(-1)
        taken = steps
        for step in range(steps):
            tokens[:, step] = token
            ended = _among(token, self._newlines) & one_line
            done |= _among(token, self._stops) | ended | (limits <= step + 1)
            checked = (step + 1) % self._check_every == 0
            if step + 1 == steps or (checked and bool(done.all())):
                taken = step + 1
                break
            state.append(torch.ones((len(plans), 1), dtype=torch.long, device=device))
            state.logits = self._forward(state, token[:, None], state.next_position[:, None])
            state.next_position = state.next_position + 1
            token = state.logits.argmax(-1)
        rows: list[list[int]] = tokens[:, :taken].tolist()
        return [row[: plan.limit] for row, plan in zip(rows, plans, strict=True)]

    # --- plumbing ---------------------------------------------------------------------------

    def _forward(
        self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        output = self._checkpoint.model(
            input_ids=ids,
            attention_mask=state.attention_mask(),
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = output.logits[:, -1].float()
        return logits

    def _empty_state(self, rows: int, width: int) -> DecodeState:
        device = self._checkpoint.device
        if self._reserve is None:
            cache: Cache = DynamicCache(config=self._checkpoint.model.config)
            columns = width
        else:
            columns = width + self._reserve
            cache = reserved_cache(self._layers, columns)
        mask = torch.zeros((rows, columns), dtype=torch.long, device=device)
        empty = torch.empty((rows, 0), device=device)
        positions = torch.zeros(rows, dtype=torch.long, device=device)
        return DecodeState(cache, mask, 0, positions, empty)

    def _cached_prefix(self, key: PrefixKey) -> torch.Tensor | None:
        return self.prefixes.get(key) if self.prefixes is not None and key else None

    def _prefix_key(self, prompt: list[int]) -> PrefixKey:
        """The tokens before the first image token, if worth caching; the frames come after."""
        image = self._checkpoint.image_token_id
        if self.prefixes is None or image not in prompt:
            return ()
        length = prompt.index(image)
        return tuple(prompt[:length]) if length >= MIN_PREFIX_TOKENS else ()


def _among(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Which ``tokens`` are one of ``ids`` (``torch.isin``, in ops every device has)."""
    return (tokens[:, None] == ids).any(-1)


def _right_aligned(
    rows: Sequence[list[int]], width: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, valid)`` of ``rows`` right-aligned in ``width`` columns, padded on the left."""
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(row)
            valid[index, width - len(row) :] = 1
    return ids, valid
