"""The ASGI app: the review page, the JSON API, ``/metrics`` and ``/healthz`` (starlette).

Handlers run on the daemon's event loop and never block it: database work is a job on the
store's thread, JPEG encoding goes to a worker thread, files are streamed by starlette's
``FileResponse`` (which also answers ``Range`` requests, so a browser can seek a clip).
Nothing is served from outside ``storage.dir``: a file is found by event id (checked against
``EVENT_ID_RE``) through the database, and its path is checked to lie under the root.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from streamd.domain import Frame
from streamd.payloads import iso_utc, parse_iso
from streamd.store.events import EventQuery, EventStore, StoredFiles, StoreError
from streamd.store.schema import EVENT_ID_RE

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
TOKEN_COOKIE = "streamd_token"  # noqa: S105 - the cookie's name, not a secret
EVENT_QUERY_KEYS = frozenset({"stream", "since", "until", "min_significance", "limit"})
OPEN_PATHS = frozenset({"/healthz"})
"""Answered without a token: a service manager's probe says only ok or why not."""


class StreamView(Protocol):
    """What the API shows of one stream (a ``StreamPipeline``)."""

    @property
    def name(self) -> str:
        """Stream name."""
        ...

    @property
    def live(self) -> bool:
        """A camera (True) or a file."""
        ...

    @property
    def healthy(self) -> bool:
        """The source delivers frames."""
        ...

    @property
    def latest_frame(self) -> Frame | None:
        """The newest sampled frame."""
        ...

    def recent_windows(self) -> list[tuple[float, float, int | None]]:
        """Analysed windows, oldest first: (wall start, wall end, significance or None)."""
        ...


class ReviewSource(Protocol):
    """What the app reads: the daemon."""

    @property
    def store(self) -> EventStore | None:
        """The event store, once open."""
        ...

    @property
    def views(self) -> Sequence[StreamView]:
        """The streams, once running."""
        ...

    def health(self) -> tuple[bool, str]:
        """``/healthz``: (ok, reason)."""
        ...


JpegOf = Callable[[Frame], bytes]


def create_app(
    source: ReviewSource,
    registry: CollectorRegistry,
    token: str | None,
    jpeg_of: JpegOf,
) -> ASGIApp:
    """The whole HTTP surface; ``token`` set: every route but ``/healthz`` needs it."""
    api = _Api(source, jpeg_of)
    routes = [
        Route("/", api.page),
        Route("/healthz", api.healthz),
        Route("/api/streams", api.streams),
        Route("/api/streams/{name}/latest.jpg", api.latest),
        Route("/api/streams/{name}/windows", api.windows),
        Route("/api/events", api.events),
        Route("/api/events/{event_id}", api.event),
        Route("/api/events/{event_id}/clip.mp4", api.clip),
        Route("/api/events/{event_id}/snapshot.jpg", api.snapshot),
        Route("/metrics", _AsgiEndpoint(make_asgi_app(registry))),
    ]
    handlers: dict[int | type[Exception], Callable[[Request, Exception], Awaitable[Response]]]
    handlers = {
        404: _not_found,
        405: _not_allowed,
        _NotFound: _as_json_error,
        _BadRequest: _as_json_error,
        StoreError: _unavailable,
        TimeoutError: _unavailable,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return app if token is None else BearerAuth(app, token)


def page_html() -> bytes:
    """The review page, from the package (no build step, no CDN)."""
    return resources.files("streamd.web").joinpath("index.html").read_bytes()


class _Api:
    def __init__(self, source: ReviewSource, jpeg_of: JpegOf) -> None:
        self._source = source
        self._jpeg_of = jpeg_of
        self._page = page_html()
        self._latest: dict[str, tuple[int, bytes]] = {}  # stream -> (frame index, JPEG)

    async def page(self, request: Request) -> Response:
        return Response(self._page, media_type="text/html; charset=utf-8", headers=_NO_CACHE)

    async def healthz(self, request: Request) -> Response:
        ok, reason = self._source.health()
        return PlainTextResponse((reason or "ok") + "\n", status_code=200 if ok else 503)

    async def streams(self, request: Request) -> Response:
        store = self._source.store
        last = await store.call(store.last_events) if store is not None else {}
        streams = [
            {"name": v.name, "up": v.healthy, "live": v.live, "last_event": last.get(v.name)}
            for v in self._source.views
        ]
        known = {v.name for v in self._source.views}
        streams += [
            {"name": name, "up": False, "live": False, "last_event": doc}
            for name, doc in sorted(last.items())
            if name not in known
        ]
        return _json({"streams": streams})

    async def latest(self, request: Request) -> Response:
        view = self._view(request.path_params["name"])
        frame = view.latest_frame
        if frame is None:
            return _error(404, f"stream {view.name!r} has no frame yet")
        cached = self._latest.get(view.name)
        if cached is not None and cached[0] == frame.index:
            jpeg = cached[1]
        else:
            jpeg = await asyncio.to_thread(self._jpeg_of, frame)
            self._latest[view.name] = (frame.index, jpeg)
        return Response(jpeg, media_type="image/jpeg", headers=_NO_CACHE)

    async def windows(self, request: Request) -> Response:
        view = self._view(request.path_params["name"])
        items = [
            {"start": iso_utc(start), "end": iso_utc(end), "significance": significance}
            for start, end, significance in view.recent_windows()
        ]
        return _json({"stream": view.name, "windows": items})

    async def events(self, request: Request) -> Response:
        query = await self._event_query(request)
        store = self._source.store
        found = [] if store is None else await store.call(store.events, query)
        return _json({"events": found})

    async def event(self, request: Request) -> Response:
        store, event_id = self._store(), _event_id(request)
        found = await store.call(store.event, event_id)
        if found is None:
            raise _NotFound(f"no event {event_id!r}")
        return _json(found)

    async def clip(self, request: Request) -> Response:
        path = await self._file(request, "clip")
        return FileResponse(path, media_type="video/mp4")

    async def snapshot(self, request: Request) -> Response:
        path = await self._file(request, "snapshot")
        return FileResponse(path, media_type="image/jpeg")

    # --- helpers -------------------------------------------------------------------------------

    def _view(self, name: str) -> StreamView:
        for view in self._source.views:
            if view.name == name:
                return view
        raise _NotFound(f"no stream {name!r}")

    def _store(self) -> EventStore:
        store = self._source.store
        if store is None:
            raise _NotFound("no events yet")
        return store

    async def _file(self, request: Request, kind: str) -> Path:
        store, event_id = self._store(), _event_id(request)
        files: StoredFiles | None = await store.call(store.files, event_id)
        name: str | None = None if files is None else getattr(files, kind)
        root = store.root
        if files is None or name is None or root is None:
            raise _NotFound(f"no {kind} for event {event_id!r}")
        base: Path = root.resolve()
        path: Path = (base / name).resolve()
        if not path.is_relative_to(base) or not await asyncio.to_thread(path.is_file):
            raise _NotFound(f"no {kind} for event {event_id!r}")
        return path

    async def _event_query(self, request: Request) -> EventQuery:
        params = request.query_params
        unknown = sorted(set(params) - EVENT_QUERY_KEYS)
        if unknown:
            raise _BadRequest(f"unknown parameter {unknown[0]!r}")
        stream = params.get("stream") or None
        if stream is not None and stream not in await self._stream_names():
            raise _NotFound(f"no stream {stream!r}")
        return EventQuery(
            stream=stream,
            since_ts=_time(params, "since"),
            until_ts=_time(params, "until"),
            min_significance=_int(params, "min_significance", 1, 10),
            limit=_int(params, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT,
        )

    async def _stream_names(self) -> set[str]:
        names = {v.name for v in self._source.views}
        store = self._source.store
        if store is not None:
            names |= await store.call(store.stream_names)
        return names


class _AsgiEndpoint:
    """An ASGI app as a route's endpoint (starlette calls a plain function with a request)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer <token>``, or the page's cookie.

    Opening ``/?token=<token>`` once sets an HttpOnly cookie and redirects to ``/``, so a
    browser (whose ``<video>`` cannot send headers) can use the page. Compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass authorised requests on; answer the rest 401."""
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if scope["path"] == "/" and self._matches(request.query_params.get("token")):
            response: Response = Response(status_code=303, headers={"Location": "/"})
            response.set_cookie(
                TOKEN_COOKIE, self._token.decode(), httponly=True, samesite="strict"
            )
            await response(scope, receive, send)
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if (scheme.lower() == "bearer" and self._matches(given.strip())) or self._matches(
            request.cookies.get(TOKEN_COOKIE)
        ):
            await self.app(scope, receive, send)
            return
        answer = _error(401, "missing or wrong token: send Authorization: Bearer <token>")
        answer.headers["WWW-Authenticate"] = 'Bearer realm="streamd"'
        await answer(scope, receive, send)

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token)


# --- errors and parsing --------------------------------------------------------------------------

_NO_CACHE = {"Cache-Control": "no-store"}


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    pass


def _json(body: object, status: int = 200) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers=_NO_CACHE,
    )


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, str(getattr(exc, "detail", "")) or f"no route {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, f"{request.method} is not allowed here: only GET")


def _event_id(request: Request) -> str:
    event_id = str(request.path_params["event_id"])
    if not EVENT_ID_RE.match(event_id):
        raise _NotFound(f"no event {event_id!r}")
    return event_id


def _time(params: Mapping[str, str], key: str) -> float | None:
    text = params.get(key)
    if not text:
        return None
    try:
        value = parse_iso(text)
    except ValueError:
        raise _BadRequest(f"{key}: not an ISO 8601 time: {text!r}") from None
    if not math.isfinite(value):
        raise _BadRequest(f"{key}: out of range")
    return value


def _int(params: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    text = params.get(key)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise _BadRequest(f"{key}: not a whole number: {text!r}") from None
    if not low <= value <= high:
        raise _BadRequest(f"{key}: must be {low}-{high}, not {value}")
    return value


async def _unavailable(request: Request, exc: Exception) -> Response:
    return _error(503, f"events are not available now: {exc or 'the store is busy'}")


async def _as_json_error(request: Request, exc: Exception) -> Response:
    status = 404 if isinstance(exc, _NotFound) else 400
    return _error(status, str(exc))
