"""KV caches of the transformers backend: buffers reserved per call, exact text prefixes kept."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

DEFAULT_PREFIX_ENTRIES = 8
"""Text prefixes kept (one per distinct system prompt and window size). At 256M dimensions in
fp32 a prefix's KV is 46 KB per token: 3-6 MB for a system prompt and preamble."""

PrefixKey = tuple[int, ...]
"""The prefix's token ids: the KV of tokens ``0..n-1`` depends on nothing else (causal)."""


class ReservedLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """One layer's keys and values in buffers reserved up front and written in place.

    ``DynamicLayer`` concatenates: each decoded token copies the layer's whole cache (at 256M
    dimensions, 60 copies of ~600 KB per row and token). Here a token writes its own column
    and attention reads a view of the columns written so far, the same values. A call that
    outgrows the buffers doubles them, so the reservation is a size hint, never a limit.

    Args:
        capacity: Tokens to reserve room for (prompt and everything decoded after it).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._capacity = capacity
        self._length = 0
        self._key_buffer = torch.empty(0)
        self._value_buffer = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Reserve the buffers, shaped as the first states (rows, heads, capacity, head_dim)."""
        self.device = key_states.device
        self._key_buffer = _reserve(key_states, self._capacity)
        self._value_buffer = _reserve(value_states, self._capacity)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new states after the cached ones; returns views of everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._key_buffer = _grow(self._key_buffer, start, end)
            self._value_buffer = _grow(self._value_buffer, start, end)
        self._key_buffer[:, :, start:end].copy_(key_states)
        self._value_buffer[:, :, start:end].copy_(value_states)
        self._length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens cached."""
        return self._length


def reserved_cache(layers: int, capacity: int) -> Cache:
    """A cache of ``layers`` ``ReservedLayer``s with room for ``capacity`` tokens each."""
    return Cache(layers=[ReservedLayer(capacity) for _ in range(layers)])


def _reserve(states: torch.Tensor, capacity: int) -> torch.Tensor:
    rows, heads, length, width = states.shape
    return states.new_empty((rows, heads, max(capacity, length), width))


def _grow(buffer: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    rows, heads, capacity, width = buffer.shape
    grown = buffer.new_empty((rows, heads, max(2 * capacity, needed), width))
    grown[:, :, :used].copy_(buffer[:, :, :used])
    return grown


class PrefixCache:
    """The KV of exact token-id prefixes (a stream's system prompt and preamble), LRU-bounded.

    Keyed by the token ids themselves: a prefix is reused only where a prompt starts with
    exactly those ids, at the same positions, so the cached keys and values are the ones a
    full prefill computes. Streams whose prompts render the same prefix share one entry.

    Args:
        capacity: Most prefixes kept; the least recently used goes first.
    """

    def __init__(self, capacity: int = DEFAULT_PREFIX_ENTRIES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PrefixKey, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: PrefixKey) -> bool:
        return key in self._entries

    def get(self, key: PrefixKey) -> torch.Tensor | None:
        """``(layers, 2, heads, len(key), head_dim)`` keys and values, or None; counts hits."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: PrefixKey, kv: torch.Tensor) -> None:
        """Keep ``kv`` (as ``get`` returns it); drops the least recently used beyond capacity."""
        self._entries[key] = kv
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()


def copy_prefix(cache: Cache, row: int, start: int, length: int) -> torch.Tensor:
    """Columns ``start:start + length`` of one row of ``cache``, as ``PrefixCache`` keeps them.

    A copy (``torch.stack`` allocates): the entry keeps no call's buffers alive.
    """
    end = start + length
    return torch.stack(
        [
            torch.stack([keys[row, :, start:end], values[row, :, start:end]])
            for keys, values in _kv(cache)
        ]
    )


def _kv(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values (attention layers only: SmolVLM2's text model has no other)."""
    found = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise TypeError(f"not a filled attention layer: {type(layer).__name__}")
        found.append((layer.keys, layer.values))
    return found


def load_prefixes(cache: Cache, prefixes: Sequence[torch.Tensor | None], width: int) -> None:
    """Fill an empty ``cache`` with each row's prefix, left-padded to ``width`` columns.

    Padding columns hold zeros; the caller's attention mask hides them.
    """
    present = next(kv for kv in prefixes if kv is not None)
    layers, _, heads, _, head_dim = present.shape
    block = present.new_zeros((layers, 2, len(prefixes), heads, width, head_dim))
    for row, kv in enumerate(prefixes):
        if kv is not None:
            block[:, :, row, :, width - kv.shape[-2] :] = kv
    for index in range(layers):
        cache.update(block[index, 0], block[index, 1], index)
