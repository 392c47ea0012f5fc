"""A one-slot mailbox between a stream's windower and its analysis loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MailboxClosed(Exception):
    """``get`` on a closed, empty mailbox."""


class Mailbox(Generic[T]):
    """Holds at most one item.

    Live streams (``replace=True``) never wait: a newer item replaces a pending one, and
    ``on_replace`` is told (the pipeline counts it as ``dropped{reason="busy"}``). Files
    (``replace=False``) wait for the slot to empty, so backpressure reaches the decoder and
    nothing is dropped.
    """

    def __init__(self, replace: bool, on_replace: Callable[[T], None] = lambda _item: None):
        self.replace = replace
        self._on_replace = on_replace
        self._item: T | None = None
        self._has_item = False
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def pending(self) -> T | None:
        """The item waiting to be taken, if any."""
        return self._item if self._has_item else None

    async def put(self, item: T) -> None:
        """Deposit ``item`` (waiting for room unless replacing); raises if closed."""
        while self._has_item and not self.replace:
            if self._closed:
                raise MailboxClosed
            self._changed.clear()
            await self._changed.wait()
        if self._closed:
            raise MailboxClosed
        if self._has_item:
            replaced = self._item
            assert replaced is not None  # noqa: S101 - _has_item says so
            self._on_replace(replaced)
        self._item, self._has_item = item, True
        self._changed.set()

    async def get(self) -> T:
        """Take the item, waiting for one; raises ``MailboxClosed`` once closed and empty."""
        while not self._has_item:
            if self._closed:
                raise MailboxClosed
            self._changed.clear()
            await self._changed.wait()
        item = self._item
        assert item is not None  # noqa: S101 - _has_item says so
        self._item, self._has_item = None, False
        self._changed.set()
        return item

    def close(self) -> T | None:
        """No more puts; ``get`` drains what is left. Returns the pending item, if any."""
        self._closed = True
        self._changed.set()
        return self.pending

    def take_pending(self) -> T | None:
        """Remove and return the pending item (shutdown: count it as dropped)."""
        item = self.pending
        self._item, self._has_item = None, False
        self._changed.set()
        return item
