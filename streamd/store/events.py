"""EventStore: every event message in SQLite before it is published; the durable outbox.

One owner thread holds the only connection (WAL mode), so nothing touches SQLite on the event
loop and no two threads share a connection. Every call is a job on that thread; the async
methods await it. Tables:

* ``streams``: the last ``seq`` of each stream, so numbering continues across restarts;
* ``events``: each event's latest message (the API's answer), its span, clip and snapshot;
* ``outbox``: event messages not yet acknowledged by the broker, in order.

A write that fails (a full disk, a damaged file) is logged once, counted in
``streamd_storage_errors_total``, and the message is published all the same: storage never
stops live publishing. A file that is not a usable database is left untouched (nothing stored
is lost) and the run goes on with an in-memory database, said in one error line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from streamd.errors import StreamdError
from streamd.metrics import Metrics
from streamd.payloads import parse_iso
from streamd.store.schema import (
    CLIPS_DIR,
    DB_NAME,
    SNAPSHOTS_DIR,
    connect,
    os_reason,
    sqlite_reason,
    with_files,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MEMORY_EVENTS = 10_000
"""Without ``storage.dir`` the in-memory store keeps at most this many events."""
CALL_TIMEOUT_S = 30.0
"""One store job: a query, a write, a retention pass."""
INTERRUPTED = "interrupted"
"""``reason`` of the ``end`` message for an event a crash left open."""


class StoreError(Exception):
    """The database cannot be used (not a database, unreadable)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One event message as stored: the outbox's unit."""

    stream: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class EventQuery:
    """``GET /api/events`` filters (validated by the caller)."""

    stream: str | None = None
    since_ts: float | None = None
    until_ts: float | None = None
    min_significance: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class StoredFiles:
    """An event's files, relative to ``storage.dir`` (None: none yet)."""

    clip: str | None
    snapshot: str | None


class EventStore:
    """The event store; ``path=None`` keeps it in memory (``storage.dir`` not set).

    Args:
        root: ``storage.dir`` (events.db, clips/, snapshots/), or None for memory only.
        metrics: ``storage_*`` instruments.
        retain_s: Events that ended longer ago are deleted with their files.
        max_bytes: Past this (database and files), the oldest ended events go first.
        clock: Unix time (tests move it).
    """

    def __init__(
        self,
        root: Path | None,
        metrics: Metrics,
        retain_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.durable = root is not None
        self._metrics = metrics
        self._retain_s = retain_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._failing: str | None = None  # the last write error, until a write works again
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamd.store")

    # --- plumbing ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the owner thread (any thread may call this; FIFO)."""
        return self._pool.submit(fn, *args)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Await ``fn(*args)`` run on the owner thread, bounded by ``CALL_TIMEOUT_S``.

        Raises ``StoreError`` once the store is closed (shutting down).
        """
        try:
            future = self.submit(fn, *args)
        except RuntimeError as exc:  # the pool is shut down
            raise StoreError("the event store is closed") from exc
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return await asyncio.wrap_future(future)

    async def open(self) -> None:
        """Open (or create) the database; a damaged one is left alone and memory is used."""
        await self.call(self._open)

    async def close(self) -> None:
        """Close the connection and end the owner thread."""
        with contextlib.suppress(TimeoutError):
            await self.call(self._close)
        self._pool.shutdown(wait=False)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        """The connection (owner thread only)."""
        if self._db is None:
            raise StoreError("the event store is not open")
        return self._db

    def _open(self) -> None:
        if self.root is None:
            self._db = connect(":memory:")
            return
        try:
            for name in (CLIPS_DIR, SNAPSHOTS_DIR):
                (self.root / name).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamdError(
                f"storage.dir {self.root}: cannot use it: {exc.strerror or exc}"
            ) from exc
        path = self.root / DB_NAME
        try:
            self._db = connect(str(path))
        except sqlite3.Error as exc:
            self._metrics.storage_errors.labels(reason=sqlite_reason(exc)).inc()
            logger.error(
                "storage: %s is not usable (%s): it is left as it is; this run keeps events"
                " in memory only (move the file away to start a new one)",
                path,
                exc,
            )
            self.durable = False
            self._db = connect(":memory:")

    # --- writes (owner thread) -----------------------------------------------------------------

    def last_seqs(self) -> dict[str, int]:
        """Each stream's last event ``seq``: numbering continues from there."""
        rows = self.db.execute("SELECT name, last_seq FROM streams").fetchall()
        return dict(rows)

    def record(self, payload: bytes) -> bool:
        """Store one event message (the event's new state and an outbox row) in one commit.

        Returns False when the write failed (it is logged and counted; the caller publishes
        the message all the same).
        """
        doc = json.loads(payload)
        try:
            with self.db:
                self._record(doc, payload)
        except sqlite3.Error as exc:
            self._write_failed(exc)
            return False
        self._write_ok()
        return True

    def _record(self, doc: dict[str, Any], payload: bytes) -> None:
        stream, seq, event_id = doc["stream"], int(doc["seq"]), doc["id"]
        db = self.db
        db.execute(
            "INSERT INTO streams (name, last_seq) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            " SET last_seq = max(last_seq, excluded.last_seq)",
            (stream, seq),
        )
        db.execute(
            "INSERT INTO events (id, stream, start_ts, end_ts, significance, peak, open, payload)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " end_ts = excluded.end_ts, significance = excluded.significance,"
            " peak = excluded.peak, open = excluded.open, payload = excluded.payload",
            (
                event_id,
                stream,
                parse_iso(doc["start"]),
                parse_iso(doc["end"]),
                int(doc["significance"]),
                int(doc["peak_significance"]),
                0 if doc["type"] == "end" else 1,
                payload.decode(),
            ),
        )
        db.execute(
            "INSERT INTO outbox (stream, seq, payload) VALUES (?, ?, ?)", (stream, seq, payload)
        )

    def settle(self, keys: Sequence[tuple[str, int]]) -> None:
        """These messages left the outbox: acknowledged by the broker, or dropped and counted."""
        try:
            with self.db:
                self.db.executemany("DELETE FROM outbox WHERE stream = ? AND seq = ?", keys)
        except sqlite3.Error as exc:
            self._write_failed(exc)

    def unsent(self) -> list[Message]:
        """The outbox: messages not yet acknowledged, oldest first."""
        rows = self.db.execute("SELECT stream, seq, payload FROM outbox ORDER BY id").fetchall()
        return [Message(stream, seq, bytes(payload)) for stream, seq, payload in rows]

    def end_interrupted(self) -> list[bytes]:
        """End every event a crash left open: an ``end`` message each, stored, oldest first.

        The message repeats the event's last state with the stream's next ``seq`` and
        ``"reason": "interrupted"``; the caller publishes them like any other.
        """
        rows = self.db.execute(
            "SELECT payload FROM events WHERE open = 1 ORDER BY start_ts"
        ).fetchall()
        seqs = self.last_seqs()
        ended: list[bytes] = []
        for (text,) in rows:
            doc = json.loads(text)
            stream = doc["stream"]
            seqs[stream] = seqs.get(stream, 0) + 1
            doc.update(type="end", seq=seqs[stream], reason=INTERRUPTED)
            payload = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
            if self.record(payload):
                ended.append(payload)
        if ended:
            logger.warning(
                "storage: ended %d event(s) left open by an unclean stop (reason %r)",
                len(ended),
                INTERRUPTED,
            )
        return ended

    def set_clip(self, event_id: str, name: str, size: int) -> None:
        """The event's clip file (relative to the root) and its size so far."""
        self._set_file(event_id, "clip", name, size)

    def set_snapshot(self, event_id: str, jpeg: bytes) -> None:
        """Write the event's snapshot file (the best frame so far) and note it."""
        if self.root is None:
            return
        name = f"{SNAPSHOTS_DIR}/{event_id}.jpg"
        path = self.root / name
        tmp = path.with_suffix(".jpg.tmp")
        try:
            tmp.write_bytes(jpeg)
            tmp.replace(path)
        except OSError as exc:
            self._metrics.storage_errors.labels(reason=os_reason(exc)).inc()
            logger.error("storage: cannot write snapshot %s: %s", path, exc.strerror or exc)
            return
        self._set_file(event_id, "snapshot", name, len(jpeg))

    def _set_file(self, event_id: str, kind: str, name: str, size: int) -> None:
        try:
            with self.db:
                self.db.execute(
                    f"UPDATE events SET {kind} = ?, {kind}_bytes = ? WHERE id = ?",  # noqa: S608
                    (name, size, event_id),
                )
        except sqlite3.Error as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: sqlite3.Error) -> None:
        reason = sqlite_reason(exc)
        self._metrics.storage_errors.labels(reason=reason).inc()
        message = str(exc)
        if message != self._failing:
            logger.error(
                "storage: cannot write %s: %s; events are still published, not stored"
                " until writing works again",
                DB_NAME,
                message,
            )
        self._failing = message

    def _write_ok(self) -> None:
        if self._failing is not None:
            logger.info("storage: writing %s again", DB_NAME)
            self._failing = None

    # --- reads (owner thread) ------------------------------------------------------------------

    def events(self, query: EventQuery) -> list[dict[str, Any]]:
        """Events matching ``query``, newest first (by start)."""
        filters = (
            ("stream = ?", query.stream),
            ("end_ts >= ?", query.since_ts),  # overlapping [since, until]
            ("start_ts <= ?", query.until_ts),
            ("peak >= ?", query.min_significance),
        )
        used = [(clause, value) for clause, value in filters if value is not None]
        sql = ["SELECT payload, clip, snapshot FROM events WHERE 1 = 1"]
        sql += [f"AND {clause}" for clause, _ in used]
        args: list[object] = [value for _, value in used]
        sql.append("ORDER BY start_ts DESC, id DESC LIMIT ?")
        args.append(query.limit)
        rows = self.db.execute(" ".join(sql), args).fetchall()
        return [with_files(*row) for row in rows]

    def event(self, event_id: str) -> dict[str, Any] | None:
        """One event's latest state, or None."""
        row = self.db.execute(
            "SELECT payload, clip, snapshot FROM events WHERE id = ?", (event_id,)
        ).fetchone()
        return None if row is None else with_files(*row)

    def files(self, event_id: str) -> StoredFiles | None:
        """The event's files (relative names), or None for an unknown event."""
        row = self.db.execute(
            "SELECT clip, snapshot FROM events WHERE id = ?", (event_id,)
        ).fetchone()
        return None if row is None else StoredFiles(row[0], row[1])

    def stream_names(self) -> set[str]:
        """Every stream that has events stored."""
        return {name for (name,) in self.db.execute("SELECT name FROM streams")}

    def last_events(self) -> dict[str, dict[str, Any]]:
        """Each stream's newest event."""
        rows = self.db.execute(
            "SELECT e.payload, e.clip, e.snapshot FROM events e WHERE e.id = (SELECT id FROM"
            " events WHERE stream = e.stream ORDER BY start_ts DESC, id DESC LIMIT 1)"
        ).fetchall()
        found = [with_files(*row) for row in rows]
        return {doc["stream"]: doc for doc in found}

    # --- retention (owner thread) --------------------------------------------------------------

    def retention(self) -> int:
        """Delete ended events past ``retain_s``, then the oldest while over ``max_bytes``.

        Files go before their row, so a crash in between leaves a row without a file (served
        as 404), never a file nobody will delete. Returns how many events were deleted.
        """
        db = self.db
        cutoff = self._clock() - self._retain_s
        old = db.execute(
            "SELECT id, clip, snapshot FROM events WHERE open = 0 AND end_ts < ? ORDER BY start_ts",
            (cutoff,),
        ).fetchall()
        deleted = self._delete(old, "age")
        over = self._bytes() - self._max_bytes
        if self.root is None:
            count = db.execute("SELECT count(*) FROM events").fetchone()[0]
            over_count = count - MEMORY_EVENTS
            if over_count > 0:
                rows = db.execute(
                    "SELECT id, clip, snapshot FROM events WHERE open = 0 ORDER BY start_ts"
                    " LIMIT ?",
                    (over_count,),
                ).fetchall()
                deleted += self._delete(rows, "count")
        elif over > 0:
            rows = db.execute(
                "SELECT id, clip, snapshot, clip_bytes + snapshot_bytes FROM events"
                " WHERE open = 0 ORDER BY start_ts"
            ).fetchall()
            chosen = []
            for event_id, clip, snapshot, size in rows:
                if over <= 0:
                    break
                chosen.append((event_id, clip, snapshot))
                over -= size
            deleted += self._delete(chosen, "size")
        self._metrics.storage_bytes.set(self._bytes())
        return deleted

    def _delete(self, rows: Sequence[tuple[str, str | None, str | None]], reason: str) -> int:
        if not rows:
            return 0
        for _event_id, clip, snapshot in rows:
            for name in (clip, snapshot):
                if name is not None and self.root is not None:
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / name).unlink()
        try:
            with self.db:
                self.db.executemany("DELETE FROM events WHERE id = ?", [(r[0],) for r in rows])
        except sqlite3.Error as exc:
            self._write_failed(exc)
            return 0
        self._metrics.storage_deleted.labels(reason=reason).inc(len(rows))
        logger.info("storage: deleted %d event(s) (%s)", len(rows), reason)
        return len(rows)

    def _bytes(self) -> int:
        files = self.db.execute(
            "SELECT coalesce(sum(clip_bytes + snapshot_bytes), 0) FROM events"
        ).fetchone()[0]
        database = 0
        if self.root is not None and self.durable:
            for suffix in ("", "-wal"):
                with contextlib.suppress(OSError):
                    database += (self.root / (DB_NAME + suffix)).stat().st_size
        return int(files) + database
