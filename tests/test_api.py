"""The HTTP API over a real socket: filters, limits, 400/404, Range, auth, traversal."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamd.config import parse_config
from streamd.errors import ConfigError
from streamd.store.events import EventQuery, EventStore
from tests.frames import bars, frame
from tests.test_store import DAY_S, Clock, messages, new_store, payload
from tests.web import FakeReview, View, serving

TOKEN = "0123456789abcdef0123"


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET, errors included; no redirects followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def aget(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, url, headers)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    """Two streams' events, newest 'yard'; one 'cam' event with a clip and a snapshot."""
    clock = Clock()
    store = new_store(tmp_path, clock)
    await store.open()
    for event in messages("cam", [7, 1, 1, 9, 1, 1]):  # two events: peak 7, then peak 9
        await store.call(store.record, payload(event))
    for event in messages("yard", [6, 1, 1], start_s=50.0):
        await store.call(store.record, payload(event))
    cam = await store.call(store.events, EventQuery(stream="cam"))
    clip = tmp_path / "clips" / f"{cam[0]['id']}.mp4"
    clip.write_bytes(bytes(range(256)) * 40)  # 10240 bytes, each offset's value known
    await store.call(store.set_clip, cam[0]["id"], f"clips/{clip.name}", 10240)
    await store.call(store.set_snapshot, cam[0]["id"], b"\xff\xd8 jpeg \xff\xd9")
    yield store
    await store.close()


@pytest.fixture
async def base(store: EventStore) -> AsyncIterator[str]:
    view = View("cam", latest_frame=frame(3, 3.0, bars(0)), windows=[(1000.0, 1004.0, 7)])
    review = FakeReview(store, [view, View("yard", live=False)])
    async with serving(review, CollectorRegistry()) as url:
        yield url


async def test_streams_and_events_newest_first(base: str) -> None:
    status, _, body = await aget(f"{base}/api/streams")
    assert status == 200
    streams = {s["name"]: s for s in json.loads(body)["streams"]}
    assert set(streams) == {"cam", "yard"}
    assert streams["cam"]["up"] is True
    assert streams["yard"]["live"] is False
    assert streams["cam"]["last_event"]["peak_significance"] == 9
    events = json.loads((await aget(f"{base}/api/events"))[2])["events"]
    assert [e["stream"] for e in events] == ["yard", "cam", "cam"]  # newest first by start
    assert all(e["type"] == "end" for e in events)
    one = json.loads((await aget(f"{base}/api/events/{events[1]['id']}"))[2])
    assert one == events[1]
    assert one["clip"] == f"/api/events/{one['id']}/clip.mp4"
    assert one["snapshot"] == f"/api/events/{one['id']}/snapshot.jpg"
    assert events[0]["clip"] is None  # yard has no clip


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("stream=cam", ["cam", "cam"]),
        ("min_significance=8", ["cam"]),
        ("limit=1", ["yard"]),
        ("stream=yard&min_significance=7", []),
        ("since=2099-01-01T00:00:00Z", []),
        ("until=1970-01-01T00:17:20Z", ["cam", "cam"]),  # cam starts at 1000 s, yard at 1050 s
        ("since=1970-01-01T00:16:55%2B00:00", ["yard", "cam"]),  # an offset works too
    ],
)
async def test_event_filters(base: str, query: str, expected: list[str]) -> None:
    status, _, body = await aget(f"{base}/api/events?{query}")
    assert status == 200, body
    assert [e["stream"] for e in json.loads(body)["events"]] == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: must be 1-500, not 0"),
        ("limit=501", "limit: must be 1-500, not 501"),
        ("limit=ten", "limit: not a whole number: 'ten'"),
        ("min_significance=11", "min_significance: must be 1-10, not 11"),
        ("since=yesterday", "since: not an ISO 8601 time: 'yesterday'"),
        ("until=2026-13-01", "until: not an ISO 8601 time"),
        ("limt=5", "unknown parameter 'limt'"),
    ],
)
async def test_malformed_queries_are_400_with_one_line(base: str, query: str, message: str) -> None:
    status, headers, body = await aget(f"{base}/api/events?{query}")
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert message in error
    assert "\n" not in error


@pytest.mark.parametrize(
    "path",
    [
        "/api/events?stream=nope",
        "/api/events/1.0-cam-99",
        "/api/events/1.0-cam-99/clip.mp4",
        "/api/streams/nope/latest.jpg",
        "/api/streams/yard/latest.jpg",  # no frame yet
        "/api/nothing",
        # Traversal: never a file outside storage.dir.
        "/api/events/..%2F..%2F..%2Fetc%2Fpasswd/clip.mp4",
        "/api/events/%2e%2e/clip.mp4",
        "/api/events/..%2fevents.db/snapshot.jpg",
        "/api/events/../../etc/passwd",
        "/api/events/1.0-x-1%00/clip.mp4",
    ],
)
async def test_unknown_things_are_404(base: str, path: str) -> None:
    status, _, body = await aget(f"{base}{path}")
    assert status == 404, (path, body)
    assert b"root:" not in body
    assert "error" in json.loads(body)


async def test_a_stored_path_outside_the_root_is_never_served(
    base: str, store: EventStore, tmp_path: Path
) -> None:
    secret = tmp_path.parent / "secret.mp4"
    secret.write_bytes(b"secret")
    cam = await store.call(store.events, EventQuery(stream="cam", limit=1))
    await store.call(store.set_clip, cam[0]["id"], "../secret.mp4", 6)
    status, _, body = await aget(f"{base}/api/events/{cam[0]['id']}/clip.mp4")
    assert status == 404
    assert b"secret" not in body


async def test_clip_range_requests(base: str, store: EventStore) -> None:
    cam = await store.call(store.events, EventQuery(stream="cam", limit=1))
    url = f"{base}/api/events/{cam[0]['id']}/clip.mp4"
    status, headers, body = await aget(url)
    assert status == 200
    assert headers["content-type"] == "video/mp4"
    assert headers["accept-ranges"] == "bytes"
    assert len(body) == 10240
    status, headers, body = await aget(url, Range="bytes=300-555")
    assert status == 206
    assert headers["content-range"] == "bytes 300-555/10240"
    assert body == bytes((300 + i) % 256 for i in range(256))
    status, _, body = await aget(url, Range="bytes=-10")  # the last 10 bytes
    assert status == 206
    assert body == bytes(range(246, 256))
    status, _, _ = await aget(url, Range="bytes=20000-")
    assert status == 416
    status, headers, body = await aget(f"{base}/api/events/{cam[0]['id']}/snapshot.jpg")
    assert (status, headers["content-type"], body) == (200, "image/jpeg", b"\xff\xd8 jpeg \xff\xd9")


async def test_latest_frame_and_windows(base: str) -> None:
    status, headers, body = await aget(f"{base}/api/streams/cam/latest.jpg")
    assert status == 200
    assert headers["content-type"] == "image/jpeg"
    assert body[:2] == b"\xff\xd8"
    windows = json.loads((await aget(f"{base}/api/streams/cam/windows"))[2])["windows"]
    assert windows == [
        {"start": "1970-01-01T00:16:40.000Z", "end": "1970-01-01T00:16:44.000Z", "significance": 7}
    ]


async def test_page_and_methods(base: str) -> None:
    status, headers, body = await aget(f"{base}/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"<html" in body
    # No CDN: nothing loaded from elsewhere (an SVG namespace URI is a name, not a load).
    assert not re.search(rb"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", body)
    assert not re.search(rb"""<link[^>]*href=["'](?!data:)""", body)
    assert b"@import" not in body
    request = urllib.request.Request(f"{base}/api/events", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as error:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
    assert error.value.code == 405
    error.value.close()


async def test_token_required_everywhere_but_healthz(store: EventStore) -> None:
    review = FakeReview(store, [View("cam")])
    async with serving(review, CollectorRegistry(), token=TOKEN) as url:
        for path in ("/", "/api/events", "/api/streams", "/metrics"):
            status, headers, _ = await aget(f"{url}{path}")
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Bearer")
        assert (await aget(f"{url}/api/events", Authorization="Bearer wrong-token-xxxxxxxx"))[
            0
        ] == 401
        status, _, body = await aget(f"{url}/api/events", Authorization=f"Bearer {TOKEN}")
        assert status == 200
        assert json.loads(body)["events"]
        assert (await aget(f"{url}/metrics", Authorization=f"Bearer {TOKEN}"))[0] == 200
        assert (await aget(f"{url}/healthz"))[0] == 200  # probes need no token
        # The page: /?token= once sets an HttpOnly cookie, then plain requests work.
        status, headers, _ = await aget(f"{url}/?token={TOKEN}")
        assert status == 303
        assert headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        jar = cookie.split(";", 1)[0]
        assert (await aget(f"{url}/api/streams", Cookie=jar))[0] == 200
        assert (await aget(f"{url}/?token=nope"))[0] == 401


def test_listening_off_loopback_needs_a_token() -> None:
    streams = {"streams": [{"name": "cam", "url": "rtsp://cam/1"}]}
    with pytest.raises(ConfigError) as error:
        parse_config({"http": {"listen": "0.0.0.0:9108"}, **streams}, {})
    assert "http: listen '0.0.0.0:9108' is not a loopback address: set auth_token" in str(
        error.value
    )
    ok = parse_config({"http": {"listen": "0.0.0.0:9108", "auth_token": TOKEN}, **streams}, {})
    assert ok.http.token() == TOKEN
    assert parse_config({"http": {"listen": "[::1]:9108"}, **streams}, {}).http.token() is None
    with pytest.raises(ConfigError, match="at least 16 characters"):
        parse_config({"http": {"listen": "0.0.0.0:1", "auth_token": "short"}, **streams}, {})
    with pytest.raises(ConfigError, match=r"metrics\.listen is an alias of http\.listen"):
        parse_config(
            {"http": {"listen": "127.0.0.1:1"}, "metrics": {"listen": "127.0.0.1:2"}, **streams},
            {},
        )


async def test_retention_changes_what_the_api_lists(tmp_path: Path) -> None:
    clock = Clock()
    store = new_store(tmp_path / "s", clock)
    await store.open()
    for event in messages("cam", [8, 1, 1]):
        await store.call(store.record, payload(event))
    review = FakeReview(store, [View("cam")])
    async with serving(review, CollectorRegistry()) as url:
        assert len(json.loads((await aget(f"{url}/api/events"))[2])["events"]) == 1
        clock.now = 1000.0 + 15 * DAY_S  # the event (at 1000 s) is now 15 days old
        assert await store.call(store.retention) == 1
        assert json.loads((await aget(f"{url}/api/events"))[2])["events"] == []
    await store.close()
