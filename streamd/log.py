"""Logging setup (text or JSON lines) and credential redaction for URLs."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Literal

_USERINFO_RE = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]*)@"
)
_QUERY_SECRET_RE = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|token|auth|key|secret|signature)=)[^&#\s]*", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """Hide credentials in a URL: ``rtsp://user:pw@host`` -> ``rtsp://user:***@host``.

    Also hides common secret query parameters (``?token=...``) that HLS feeds carry.
    """
    url = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
    return _QUERY_SECRET_RE.sub(lambda m: f"{m['key']}***", url)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Configure the root logger for the CLI (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at WARNING unless asked for DEBUG.
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in ("transformers", "urllib3", "httpx", "huggingface_hub", "libav"):
        logging.getLogger(name).setLevel(quiet)
