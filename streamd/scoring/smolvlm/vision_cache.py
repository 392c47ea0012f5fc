"""Per-frame SmolVLM vision features, computed once and shared by every window holding the frame."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamd.domain import Frame, Image, Window
from streamd.errors import ModelError
from streamd.scoring.smolvlm.checkpoint import Normalization

FrameKey = tuple[str, int]
"""``(stream, frame.index)``: frame indices are never reused within a stream."""

DEFAULT_CAPACITY_FRAMES = 512
"""Safety net only: eviction by window start keeps the cache at about the frames in flight."""
MAX_VISION_BATCH = 64
"""Frames per vision-encoder call; transformers itself samples at most 64 frames per video."""


class FrameFeatureCache:
    """Vision features by frame, bounded twice: by window start and by an LRU capacity.

    Windows of a stream advance monotonically, so once a window starting at frame ``i`` is
    scored, no later window needs that stream's frames before ``i``: ``evict_before`` drops
    them and the cache holds about one window of frames per stream. The LRU capacity catches
    what that rule cannot see (streams that stopped, windows scored out of order).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY_FRAMES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[FrameKey, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: FrameKey) -> bool:
        return key in self._entries

    def get(self, key: FrameKey) -> torch.Tensor | None:
        """The features of ``key``, marked most recently used; None if absent."""
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: FrameKey, features: torch.Tensor) -> None:
        """Store ``features``; drops the least recently used entries beyond ``capacity``."""
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def evict_before(self, stream: str, index: int) -> int:
        """Drop ``stream``'s frames with an index below ``index``; returns how many."""
        stale = [key for key in self._entries if key[0] == stream and key[1] < index]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def discard_stream(self, stream: str) -> None:
        """Drop every frame of ``stream``."""
        self.evict_before(stream, index=2**63)

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()


@dataclass(frozen=True, slots=True)
class EncodedWindows:
    """What ``FrameEncoder.encode`` produced for a batch of windows.

    Attributes:
        features: Per window, its frames' features concatenated in frame order,
            shape ``(frames * image_seq_len, text_hidden)`` (``(0, 0)`` without frames).
        hits: Per window, frames whose features already existed (cached, or encoded for an
            earlier window of the same call).
        misses: Per window, frames encoded for it.
        seconds: Wall time of the vision calls (shared by the whole batch).
    """

    features: list[torch.Tensor]
    hits: list[int]
    misses: list[int]
    seconds: float


class FrameEncoder:
    """Runs SmolVLM's vision encoder + connector on single frames, through a ``FrameFeatureCache``.

    Args:
        image_features: ``model.model.get_image_features``.
        normalization: The checkpoint's rescale factor, mean and std.
        device: Where the model runs.
        dtype: The model's dtype.
        cache: Where features are kept between calls.
        synchronize: Waits for the device, so that timings are true on GPUs.
    """

    def __init__(
        self,
        image_features: Callable[..., object],
        normalization: Normalization,
        device: torch.device,
        dtype: torch.dtype,
        cache: FrameFeatureCache,
        synchronize: Callable[[], None],
    ) -> None:
        self._image_features = image_features
        self._device = device
        self._dtype = dtype
        self.cache = cache
        self._synchronize = synchronize
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(normalization.mean, dtype=torch.float32).view(shape).to(device)
        self._std = torch.tensor(normalization.std, dtype=torch.float32).view(shape).to(device)
        self._rescale = normalization.rescale_factor

    def pixel_values(self, images: Sequence[Image]) -> torch.Tensor:
        """Normalise RGB uint8 frames into ``(n, 3, height, width)`` model inputs.

        The arithmetic of SmolVLM's image processor, bit for bit: ``x * rescale_factor`` in
        float64, then ``(x - mean) / std`` in float32 (``x / 127.5 - 1`` for SmolVLM2).
        """
        batch = torch.from_numpy(np.stack(images)).to(self._device).permute(0, 3, 1, 2)
        # float64 is not on MPS; there float32 rescaling is within one ulp.
        wide = torch.float32 if self._device.type == "mps" else torch.float64
        pixels = (batch.to(wide) * self._rescale).to(torch.float32)
        return ((pixels - self._mean) / self._std).to(self._dtype)

    def encode(self, windows: Sequence[Window]) -> EncodedWindows:
        """Features for every frame of ``windows``, encoding only frames never seen before.

        Evicts first: a window of stream S starting at frame ``i`` means S's frames before
        ``i`` are no longer needed (the earliest start per stream in this call counts).
        """
        earliest: dict[str, int] = {}
        for window in windows:
            if window.frames:
                first = window.frames[0].index
                earliest[window.stream] = min(first, earliest.get(window.stream, first))
        for stream, index in earliest.items():
            self.cache.evict_before(stream, index)

        known: dict[FrameKey, torch.Tensor] = {}
        pending: dict[FrameKey, Frame] = {}
        hits: list[int] = []
        misses: list[int] = []
        for window in windows:
            window_hits = 0
            for frame in window.frames:
                key = (frame.stream, frame.index)
                if key in known or key in pending:
                    window_hits += 1
                elif (cached := self.cache.get(key)) is not None:
                    known[key] = cached
                    window_hits += 1
                else:
                    pending[key] = frame
            hits.append(window_hits)
            misses.append(len(window.frames) - window_hits)

        started = time.perf_counter()
        if pending:
            known.update(self._encode_frames(pending))
            self._synchronize()
        seconds = time.perf_counter() - started if pending else 0.0
        features = [
            torch.cat([known[(frame.stream, frame.index)] for frame in window.frames])
            if window.frames
            else torch.empty((0, 0), device=self._device, dtype=self._dtype)
            for window in windows
        ]
        return EncodedWindows(features, hits, misses, seconds)

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        """Encode and cache those of ``frames`` not cached yet; returns how many were encoded."""
        pending = {
            (frame.stream, frame.index): frame
            for frame in frames
            if (frame.stream, frame.index) not in self.cache
        }
        if pending:
            self._encode_frames(pending)
            self._synchronize()
        return len(pending)

    def _encode_frames(self, frames: dict[FrameKey, Frame]) -> dict[FrameKey, torch.Tensor]:
        keys = list(frames)
        encoded: dict[FrameKey, torch.Tensor] = {}
        for start in range(0, len(keys), MAX_VISION_BATCH):
            chunk = keys[start : start + MAX_VISION_BATCH]
            pixels = self.pixel_values([frames[key].image for key in chunk])
            # (n, 1, C, H, W): one "image" per sample, so the output is already split by frame.
            output = self._image_features(pixel_values=pixels.unsqueeze(1))
            per_frame = getattr(output, "pooler_output", None)
            if not isinstance(per_frame, list | tuple) or len(per_frame) != len(chunk):
                # get_image_features drops all-zero images as padding: never for real frames.
                raise ModelError("the vision encoder returned an unexpected number of frames")
            for key, features in zip(chunk, per_frame, strict=True):
                # Own copy: a view would keep the whole batch's buffer alive in the cache.
                owned = features.clone()
                self.cache.put(key, owned)
                encoded[key] = owned
        return encoded
