"""The ``storage`` and ``http`` config sections: where events are kept and how they are served.

Pure: the ``*_file`` secret is read by ``config._read_files`` with the other files.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from streamd.sections import Section, resolve_path

MAX_PORT = 65535
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check both parts."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"must be host:port, not {value!r}")
    port = int(port_text)
    if port > MAX_PORT:
        raise ValueError(f"port {port} out of range 0-{MAX_PORT}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, port


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: only this machine can connect."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class StorageConfig(Section):
    """``storage``: the durable event store, clips and snapshots (``dir: ""`` = off)."""

    dir: Path | None = Field(None, description="events.db, clips/, snapshots/; empty = off")
    retain_days: float = Field(14.0, gt=0, le=36500, description="older events are deleted")
    max_gb: float = Field(20.0, gt=0, le=1_000_000, description="oldest go first past this")
    pre_roll_s: float = Field(5.0, ge=0, le=120, description="video kept before an event")
    post_roll_s: float = Field(5.0, ge=0, le=600, description="and after its end")

    @field_validator("dir", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("dir")
    @classmethod
    def _relative(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else Path(os.path.normpath(resolve_path(value, info)))

    @property
    def enabled(self) -> bool:
        """A directory is set."""
        return self.dir is not None

    @property
    def max_bytes(self) -> int:
        """``max_gb`` in bytes (10^9)."""
        return int(self.max_gb * 1e9)


class HttpConfig(Section):
    """``http``: the one server for the review page, the API, ``/metrics`` and ``/healthz``."""

    listen: str = Field("127.0.0.1:9108", description='host:port; "" = off')
    auth_token: SecretStr | None = Field(None, description="Authorization: Bearer <token>")
    auth_token_file: Path | None = Field(None, description="read auth_token from this file")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @field_validator("auth_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < MIN_TOKEN_CHARS:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 16`)")
        return value

    @field_validator("auth_token_file")
    @classmethod
    def _relative(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> HttpConfig:
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("set auth_token or auth_token_file, not both")
        address = self.address
        has_token = self.auth_token is not None or self.auth_token_file is not None
        if address is not None and not is_loopback(address[0]) and not has_token:
            raise ValueError(
                f"listen {self.listen!r} is not a loopback address: set auth_token or"
                " auth_token_file (anyone who can reach the port would see every camera)"
            )
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, or None when disabled."""
        return parse_listen(self.listen) if self.listen else None

    def token(self) -> str | None:
        """The bearer token (after ``auth_token_file`` was read), or None for no auth."""
        return None if self.auth_token is None else self.auth_token.get_secret_value().strip()
