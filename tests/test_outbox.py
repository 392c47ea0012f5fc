"""The pure outbox: order, bounded drop-oldest, acks that may come after a drop (hypothesis)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from streamd.sinks.outbox import Entry, Outbox

STREAMS = ("a", "b", "c")


@dataclass(frozen=True, slots=True)
class Message:
    """An event message as the outbox sees it: which stream, its per-stream seq, a unique id."""

    uid: int
    stream: str
    seq: int


class OutboxMachine(RuleBasedStateMachine):
    """A publisher and a consumer around one outbox, over connections that keep dropping.

    ``send`` puts the oldest messages on the wire (the consumer sees them at once); ``ack``
    delivers the PUBACKs of the first of them, in order; ``reconnect`` loses the acks of
    whatever is in flight, which is then sent again. Meanwhile ``append`` may drop messages
    that are in flight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outbox: Outbox[Message] = Outbox(1)
        self.uids = itertools.count()
        self.seqs: dict[str, int] = defaultdict(int)
        self.appended: list[Message] = []
        self.dropped: list[Message] = []  # as reported by the callback
        self.acked: list[Message] = []
        self.received: list[Message] = []  # what the consumer saw, duplicates included
        self.in_flight: list[Entry[Message]] = []
        self.retired: list[Entry[Message]] = []  # entries acked or dropped already

    @initialize(capacity=st.integers(1, 8))
    def start(self, capacity: int) -> None:
        self.outbox = Outbox(capacity, self.dropped.append)

    @rule(stream=st.sampled_from(STREAMS))
    def append(self, stream: str) -> None:
        self.seqs[stream] += 1
        message = Message(next(self.uids), stream, self.seqs[stream])
        before = list(self.outbox)
        full = len(before) == self.outbox.capacity
        reported = len(self.dropped)
        dropped = self.outbox.append(message)
        self.appended.append(message)
        if full:
            assert dropped == before[0]  # the oldest goes first
            assert self.dropped[reported:] == [dropped]  # ... and is reported once
        else:
            assert dropped is None
            assert len(self.dropped) == reported
        assert list(self.outbox) == [*before[1:], message] if full else [*before, message]

    @precondition(lambda self: not self.in_flight)
    @rule(count=st.integers(1, 10))
    def send(self, count: int) -> None:
        batch = self.outbox.peek(count)
        assert [e.item for e in batch] == list(self.outbox)[:count]
        self.received.extend(e.item for e in batch)
        self.in_flight = batch

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, len(self.in_flight)))
        for entry in self.in_flight[:count]:
            queued = entry.item in list(self.outbox)
            size = len(self.outbox)
            assert self.outbox.ack(entry) is queued
            assert len(self.outbox) == size - queued
            if queued:
                self.acked.append(entry.item)
            else:
                assert entry.item in self.dropped  # dropped while in flight: counted there
            self.retired.append(entry)
        self.in_flight = self.in_flight[count:]

    @rule()
    def reconnect(self) -> None:
        self.in_flight = []  # no PUBACK for these: they stay queued and go out again

    @precondition(lambda self: bool(self.retired))
    @rule(data=st.data())
    def ack_again(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.retired))
        before = list(self.outbox)
        assert not self.outbox.ack(entry)
        assert list(self.outbox) == before

    @invariant()
    def order_is_kept_and_bounded(self) -> None:
        uids = [m.uid for m in self.outbox]
        assert uids == sorted(uids)
        assert len(self.outbox) <= self.outbox.capacity

    @invariant()
    def every_message_is_accounted_for_once(self) -> None:
        queued, acked, dropped = list(self.outbox), self.acked, self.dropped
        assert len(queued) + len(acked) + len(dropped) == len(self.appended)
        assert {*queued, *acked, *dropped} == set(self.appended)
        assert self.outbox.dropped == len(dropped)

    @invariant()
    def consumer_sees_seqs_in_order_with_only_counted_gaps(self) -> None:
        first_seen = list(dict.fromkeys(self.received))
        dropped = {(m.stream, m.seq) for m in self.dropped}
        for stream in STREAMS:
            seqs = [m.seq for m in first_seen if m.stream == stream]
            assert seqs == sorted(set(seqs))  # increasing, no repeats among first sightings
            missing = set(range(1, max(seqs, default=0) + 1)) - set(seqs)
            assert {(stream, seq) for seq in missing} <= dropped

    def teardown(self) -> None:
        """Drain over a good connection: every message not dropped reaches the consumer."""
        self.in_flight = []
        while self.outbox:
            for entry in self.outbox.peek(4):
                self.received.append(entry.item)
                assert self.outbox.ack(entry)
                self.acked.append(entry.item)
        self.every_message_is_accounted_for_once()
        self.consumer_sees_seqs_in_order_with_only_counted_gaps()
        assert set(self.appended) - set(self.dropped) <= set(self.received)
        assert self.outbox.drops_since_empty == 0


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, database=None
)


def test_an_ack_after_a_drop_removes_nothing_else() -> None:
    drops: list[str] = []
    outbox: Outbox[str] = Outbox(2, drops.append)
    outbox.append("e1")
    outbox.append("e2")
    first, second = outbox.peek(2)  # both in flight
    assert outbox.append("e3") == "e1"  # e1 dropped while in flight
    assert drops == ["e1"]
    assert outbox.dropped == outbox.drops_since_empty == 1
    assert not outbox.ack(first)  # its PUBACK arrives: counted as dropped, nothing removed
    assert list(outbox) == ["e2", "e3"]
    assert outbox.ack(second)
    assert not outbox.ack(second)
    assert list(outbox) == ["e3"]
    assert outbox.drops_since_empty == 1  # still the same overflow spell
    (third,) = outbox.peek(5)
    assert outbox.ack(third)
    assert len(outbox) == 0
    assert not outbox
    assert outbox.drops_since_empty == 0  # empty again: the next drop starts a new spell
    assert outbox.dropped == 1


def test_peek_takes_the_oldest_and_removes_nothing() -> None:
    outbox: Outbox[int] = Outbox(10)
    for item in range(5):
        outbox.append(item)
    assert [e.item for e in outbox.peek(3)] == [0, 1, 2]
    assert [e.item for e in outbox.peek(0)] == []
    assert [e.item for e in outbox.peek(99)] == [0, 1, 2, 3, 4]
    assert len(outbox) == 5


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Outbox[int](0)
