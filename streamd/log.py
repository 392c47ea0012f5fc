"""Logging setup (text or JSON lines), credential redaction for URLs, escaping for log lines."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Literal

REDACTED = "***"
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::\d*)?(?=[/?#]|\Z)")
"""A host, an optional port, then the path, query, fragment or the end: what follows userinfo."""
SECRET_KEYS = frozenset(
    {
        "access_key",
        "access_token",
        "api_key",
        "apikey",
        "auth",
        "authorization",
        "client_secret",
        "code",
        "credential",
        "credentials",
        "hdnea",
        "hdnts",
        "id_token",
        "key",
        "pass",
        "passwd",
        "password",
        "policy",
        "pwd",
        "refresh_token",
        "secret",
        "session",
        "sessionid",
        "sig",
        "signature",
        "token",
    }
)
"""Query keys whose values are secrets (compared lower-case, ``-`` read as ``_``)."""
_SECRET_KEY_RE = re.compile(r"token|secret|passw|signature|credential|api_?key|^x_(amz|goog)_")
"""Also secret: any key with one of these in its name (``X-Amz-*``, ``X-Goog-*`` too)."""
_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""C0 and C1 controls (newlines included), Unicode line breaks and bidi overrides."""
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "urllib3", "httpx", "libav")
"""Third-party loggers: they go through streamd's handler, at WARNING unless DEBUG is asked."""


def redact_url(url: str) -> str:
    """Hide credentials in a URL: ``rtsp://user:pw@host`` -> ``rtsp://user:***@host``.

    The password runs to the rightmost ``@`` that is followed by a host, so a password with a
    raw ``@``, ``/``, ``:`` or space is hidden whole. Query and fragment parameters with a
    secret-looking key (``token``, ``api_key``, ``sig``, ``X-Amz-Signature``...) are hidden too.
    A user without a password is kept.
    """
    scheme = _SCHEME_RE.match(url)
    if scheme is None:
        return url
    head, rest = url[: scheme.end()], url[scheme.end() :]
    at = _userinfo_end(rest)
    if at is not None:
        user, colon, _password = rest[:at].partition(":")
        head += f"{user}:{REDACTED}@" if colon else rest[: at + 1]
        rest = rest[at + 1 :]
    host = _HOST_RE.match(rest)
    split = host.end() if host else 0
    head, rest = head + rest[:split], rest[split:]
    path, hash_mark, fragment = rest.partition("#")
    path, question, query = path.partition("?")
    return head + path + question + _redact_params(query) + hash_mark + _redact_params(fragment)


def _userinfo_end(rest: str) -> int | None:
    """Index of the ``@`` that ends the userinfo of ``rest`` (the URL after ``scheme://``).

    First the rightmost ``@`` followed by a host before any ``?`` or ``#`` (an ``@`` in a query
    is an e-mail, not a login); if none, and no ``/`` comes first, a password that holds a raw
    ``?`` or ``#``: the rightmost ``@`` followed by a host anywhere.
    """
    ends = [i for i in (rest.find("?"), rest.find("#")) if i >= 0]
    cut = min(ends, default=len(rest))
    limits = [cut] if "/" in rest[:cut] or cut == len(rest) else [cut, len(rest)]
    for limit in limits:
        at = rest.rfind("@", 0, limit)
        while at >= 0:
            if _HOST_RE.match(rest, at + 1):
                return at
            at = rest.rfind("@", 0, at)
    return None


def _redact_params(params: str) -> str:
    if not params:
        return params
    pieces = []
    for piece in params.split("&"):
        key, equals, _value = piece.partition("=")
        pieces.append(f"{key}={REDACTED}" if equals and is_secret_key(key) else piece)
    return "&".join(pieces)


def is_secret_key(key: str) -> bool:
    """Whether a query parameter named ``key`` carries a secret (case-insensitive)."""
    name = key.strip().lower().replace("-", "_").replace("%5f", "_")
    return name in SECRET_KEYS or _SECRET_KEY_RE.search(name) is not None


def printable(text: str) -> str:
    r"""``text`` safe for one log line: control characters escaped as Python does (``\x08``).

    Newlines become ``\n`` too, so a model's answer can never forge a second log line, and
    Unicode line breaks and bidi overrides are escaped as well. Everything else is unchanged.
    """
    return _UNPRINTABLE_RE.sub(lambda m: repr(m[0])[1:-1], text)


class TextFormatter(logging.Formatter):
    """``asctime level logger: message``, with the message passed through ``printable``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Render the message part of ``record`` (tracebacks keep their lines)."""
        message = record.message
        record.message = printable(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": printable(record.getMessage()),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Configure the root logger for the CLI (stderr): every library's records included."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at WARNING unless asked for DEBUG.
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)  # warnings.warn() of libraries: a log line in our format
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Send transformers' and huggingface_hub's records through the root handler, once.

    Both install their own plain-text stderr handler when imported (transformers also stops
    propagation), so with ``--log-format json`` their warnings came out as text, or twice.
    ``setup_logging`` calls this for libraries already imported; a backend calls it again
    right after importing them. Idempotent.
    """
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        # Make transformers install its handler now (it does so lazily, once), then drop it.
        transformers_logging.get_logger("transformers")
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
