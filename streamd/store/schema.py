"""The event database's schema and the small pure helpers around it (names, errors, rows)."""

from __future__ import annotations

import errno
import json
import re
import sqlite3
from typing import Any

DB_NAME = "events.db"
CLIPS_DIR = "clips"
SNAPSHOTS_DIR = "snapshots"
EVENT_ID_RE = re.compile(r"^[0-9]+\.[0-9]+-[a-z0-9_-]+-[0-9]+$")
"""What an event id looks like (``1764012345.123456-frontdoor-7``): safe as a file name."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    stream TEXT NOT NULL,
    start_ts REAL NOT NULL,
    end_ts REAL NOT NULL,
    significance INTEGER NOT NULL,
    peak INTEGER NOT NULL,
    open INTEGER NOT NULL,
    payload TEXT NOT NULL,
    clip TEXT,
    clip_bytes INTEGER NOT NULL DEFAULT 0,
    snapshot TEXT,
    snapshot_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_by_start ON events (start_ts);
CREATE INDEX IF NOT EXISTS events_by_stream ON events (stream, start_ts);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


def connect(target: str) -> sqlite3.Connection:
    """Open, switch to WAL, create the schema; raises ``sqlite3.Error`` for a damaged file."""
    db = sqlite3.connect(target, isolation_level="DEFERRED", check_same_thread=True)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: a process crash loses no commit
        db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM outbox").fetchone()
    except sqlite3.Error:
        db.close()
        raise
    return db


def with_files(payload: str, clip: str | None, snapshot: str | None) -> dict[str, Any]:
    """A stored event message with its ``clip`` and ``snapshot`` routes (null: no file)."""
    doc: dict[str, Any] = json.loads(payload)
    event_id = doc["id"]
    doc["clip"] = f"/api/events/{event_id}/clip.mp4" if clip else None
    doc["snapshot"] = f"/api/events/{event_id}/snapshot.jpg" if snapshot else None
    return doc


def sqlite_reason(exc: sqlite3.Error) -> str:
    """The ``storage_errors_total`` reason of an SQLite error."""
    code = getattr(exc, "sqlite_errorname", "")
    if code in ("SQLITE_FULL",) or "full" in str(exc):
        return "disk_full"
    if code in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in str(exc):
        return "corrupt"
    return "error"


def os_reason(exc: OSError) -> str:
    """The ``storage_errors_total`` reason of a file error."""
    return "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "error"
