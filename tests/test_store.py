"""The event store on real SQLite files: outbox, seq across reopenings, crash recovery, retention,
a damaged database and a full disk (a tiny tmpfs of the test's own)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamd.aggregate import EventAggregator
from streamd.domain import Event, Score
from streamd.metrics import Metrics
from streamd.payloads import encode, event_payload
from streamd.sinks import LogSink
from streamd.sinks.stored import StoredSink
from streamd.store.events import INTERRUPTED, EventQuery, EventStore
from streamd.store.schema import DB_NAME
from tests.frames import window as make_window

DAY_S = 86400.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_store(root: Path | None, clock: Clock | None = None, max_bytes: int = 10**9) -> EventStore:
    return EventStore(root, Metrics(CollectorRegistry()), 14 * DAY_S, max_bytes, clock or Clock())


def messages(stream: str, scores: list[int], start_s: float = 0.0, seq: int = 0) -> list[Event]:
    """The event messages an aggregator makes of one window per score (4 s apart)."""
    aggregator = EventAggregator(stream, 6, 0.0, last_seq=seq)
    out: list[Event] = []
    for index, significance in enumerate(scores):
        window = make_window(index + 1, start_s + 4 * index, start_s + 4 * index + 4, stream)
        out += aggregator.observe(window, Score(significance, f"w{index}", ""))
    return out


def payload(event: Event) -> bytes:
    return encode(event_payload(event, "surveillance", "motion", files=False))


async def test_outbox_and_seq_survive_reopening(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    await store.open()
    events = messages("cam", [8, 8, 1, 1, 9, 1, 1])  # new, update, end, new, end
    for event in events:
        assert await store.call(store.record, payload(event))
    await store.call(store.settle, [("cam", 1), ("cam", 2)])
    await store.close()

    again = new_store(tmp_path)
    await again.open()
    assert await again.call(again.last_seqs) == {"cam": 5}
    unsent = await again.call(again.unsent)
    assert [m.seq for m in unsent] == [3, 4, 5]  # in order, the acked ones gone
    assert json.loads(unsent[0].payload)["type"] == "end"
    listed = await again.call(again.events, EventQuery())
    assert [e["type"] for e in listed] == ["end", "end"]  # each event's latest state
    assert listed[0]["start"] > listed[1]["start"]  # newest first
    await again.close()


async def test_an_event_left_open_is_ended_on_the_next_start(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    await store.open()
    for event in messages("cam", [8, 9]):  # new, update: then the process dies
        await store.call(store.record, payload(event))
    await store.close()

    again = new_store(tmp_path)
    await again.open()
    ended = await again.call(again.end_interrupted)
    assert len(ended) == 1
    doc = json.loads(ended[0])
    assert (doc["type"], doc["seq"], doc["reason"]) == ("end", 3, INTERRUPTED)
    assert doc["peak_significance"] == 9
    assert await again.call(again.end_interrupted) == []  # once
    assert [m.seq for m in await again.call(again.unsent)][-1] == 3
    await again.close()


async def test_stored_sink_resends_the_outbox_first_and_seq_continues(tmp_path: Path) -> None:
    delivered: list[tuple[str, int]] = []

    def deliver_nothing(settle: object) -> LogSink:
        return LogSink()  # never settles: like a broker that is away

    store = new_store(tmp_path)
    await store.open()
    sink = StoredSink(store, deliver_nothing)
    assert await sink.start() == {}
    for event in messages("cam", [8, 1, 1]):
        sink.event(event, payload(event))
    await sink.flush()
    await store.close()

    class Recording(LogSink):
        def event(self, event: Event, body: bytes) -> None:
            delivered.append((event.stream, event.seq))
            super().event(event, body)

    store = new_store(tmp_path)
    await store.open()
    sink = StoredSink(store, lambda settle: Recording(on_settled=settle))
    seqs = await sink.start()
    assert seqs == {"cam": 2}
    for event in messages("cam", [9, 1, 1], start_s=100.0, seq=seqs["cam"]):
        sink.event(event, payload(event))
    await sink.flush()
    assert delivered == [("cam", 1), ("cam", 2), ("cam", 3), ("cam", 4)]
    await store.call(lambda: None)  # the settles queued before this ran
    assert await store.call(store.unsent) == []
    await store.close()


async def test_retention_by_age_then_size_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    store = new_store(tmp_path, clock, max_bytes=10**9)
    await store.open()
    ids = []
    for day in range(5):  # one ended event per day, each with a 1000-byte clip
        for made in messages("cam", [8, 1, 1], start_s=day * DAY_S):
            wall = clock.now - (17 - day) * DAY_S
            event = dataclasses.replace(made, wall_start_s=wall, wall_end_s=wall + 8)
            await store.call(store.record, payload(event))
        ids.append(event.id)
        clip = tmp_path / "clips" / f"{event.id}.mp4"
        clip.write_bytes(b"x" * 1000)
        await store.call(store.set_clip, event.id, f"clips/{event.id}.mp4", 1000)
    # Events ended 17..13 days ago; 14 days kept: the three oldest go.
    assert await store.call(store.retention) == 3
    left = [e["id"] for e in await store.call(store.events, EventQuery())]
    assert left == [ids[4], ids[3]]
    assert not (tmp_path / "clips" / f"{ids[0]}.mp4").exists()
    assert (tmp_path / "clips" / f"{ids[3]}.mp4").exists()
    await store.close()
    small = new_store(tmp_path, clock, max_bytes=1)  # far over: everything ended goes, oldest first
    await small.open()
    assert await small.call(small.retention) == 2
    assert await small.call(small.events, EventQuery()) == []
    registry_value = small._metrics.registry.get_sample_value(
        "streamd_storage_deleted_events_total", {"reason": "size"}
    )
    assert registry_value == 2
    await small.close()


async def test_a_damaged_database_is_left_alone_and_memory_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"this is not an sqlite database" * 100
    (tmp_path / DB_NAME).write_bytes(garbage)
    store = new_store(tmp_path)
    with caplog.at_level(logging.ERROR):
        await store.open()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert DB_NAME in errors[0]
    assert "left as it is" in errors[0]
    assert not store.durable
    event = messages("cam", [8])[0]
    assert await store.call(store.record, payload(event))  # this run goes on in memory
    assert len(await store.call(store.events, EventQuery())) == 1
    await store.close()
    assert (tmp_path / DB_NAME).read_bytes() == garbage  # nothing stored is lost


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_disk_full_is_one_error_and_nothing_stored_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tiny_filesystem(tmp_path / "small", "256k") as root:
        store = new_store(root)
        await store.open()
        first = messages("cam", [8])[0]
        assert await store.call(store.record, payload(first))
        filler = root / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as handle:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        later = messages("cam", [8] * 200, seq=1)  # updates with long descriptions
        results = []
        with caplog.at_level(logging.ERROR):
            for event in later:
                big = dataclasses.replace(event, description="y" * 4000)
                results.append(await store.call(store.record, payload(big)))
        assert False in results  # the disk filled up
        errors = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(errors) == 1, errors  # one clear line, not one per message
        assert "full" in errors[0]
        registry = store._metrics.registry
        assert registry.get_sample_value("streamd_storage_errors_total", {"reason": "disk_full"})
        filler.unlink()
        event = messages("cam", [8], start_s=5000.0, seq=300)[0]
        with caplog.at_level(logging.INFO):
            assert await store.call(store.record, payload(event))  # room again: writes again
        assert any("writing events.db again" in r.getMessage() for r in caplog.records)
        await store.close()
        again = new_store(root)
        await again.open()
        ids = {e["id"] for e in await again.call(again.events, EventQuery(limit=500))}
        assert first.id in ids
        assert event.id in ids
        await again.close()
