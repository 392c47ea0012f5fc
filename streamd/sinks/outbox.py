"""Outbox: the bounded, ordered queue of event messages waiting for the broker's ack (pure)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """One queued message and the ticket that acks it (tickets are never reused)."""

    ticket: int
    item: T


class Outbox(Generic[T]):
    """A bounded FIFO of messages that leave only when acked, or when dropped as the oldest.

    Sending is separate from removal: ``peek`` hands out the oldest entries, which stay queued
    until ``ack``; whatever was not acked when a connection dropped is simply peeked (sent)
    again, in order. Appending past ``capacity`` drops the oldest entry, even one in flight,
    and reports it through ``on_drop``. An entry acked after it was dropped is ignored: it is
    counted once (as dropped) and removes nothing else. So every appended message ends up
    acked or dropped, exactly one of the two.

    Args:
        capacity: Most messages held; at least 1.
        on_drop: Called with each message dropped to make room, oldest first.
    """

    def __init__(self, capacity: int, on_drop: Callable[[T], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._on_drop = on_drop
        self._entries: OrderedDict[int, T] = OrderedDict()
        self._tickets = itertools.count()
        self.dropped = 0  # messages dropped to make room, ever
        self.drops_since_empty = 0  # drops since the outbox was last empty (one overflow)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[T]:
        """The queued messages, oldest first."""
        return iter(self._entries.values())

    def append(self, item: T) -> T | None:
        """Queue ``item`` as the newest; returns the oldest message dropped for room, if any."""
        dropped: T | None = None
        if len(self._entries) >= self.capacity:
            _, dropped = self._entries.popitem(last=False)
            self.dropped += 1
            self.drops_since_empty += 1
        self._entries[next(self._tickets)] = item
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)
        return dropped

    def peek(self, count: int) -> list[Entry[T]]:
        """The oldest ``count`` entries (fewer if fewer are queued), oldest first; none leave."""
        head = itertools.islice(self._entries.items(), max(0, count))
        return [Entry(ticket, item) for ticket, item in head]

    def ack(self, entry: Entry[T]) -> bool:
        """Remove ``entry`` if it is still queued; False if it was dropped (or acked) already."""
        if entry.ticket not in self._entries:
            return False
        del self._entries[entry.ticket]
        if not self._entries:
            self.drops_since_empty = 0
        return True
