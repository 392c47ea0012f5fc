"""Configuration schema and loader: YAML -> validated, frozen ``Config``.

Everything is validated once at startup; components get only their own sub-model. Errors are
collected, not raised one at a time, so a user sees every problem of a file in one go, one line
each (``streams[1].url: field required``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from streamd.errors import ConfigError
from streamd.log import redact_url

STREAM_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_PORT = 65535
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"

Profile = Literal["highlights", "sports", "surveillance", "scene", "technical"]
PROFILES: tuple[str, ...] = ("highlights", "sports", "surveillance", "scene", "technical")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ModelConfig(_Strict):
    """Which model scores the windows, and where it runs."""

    backend: Literal["auto", "transformers", "mlx", "motion"] = Field(
        "auto", description="auto: mlx on Apple Silicon with mlx-vlm installed, else transformers"
    )
    id: str = Field(DEFAULT_MODEL_ID, min_length=1, description="hub id or local directory")
    device: str = Field("auto", description="auto | cuda | cuda:N | mps | cpu")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto picks from the hardware"
    )
    max_new_tokens: int = Field(64, ge=1, le=1024, description="longest description, in tokens")
    timeout_s: float = Field(
        120.0, gt=0, le=3600, description="one window's analysis longer than this stalls the runner"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_RE.match(value):
            raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, not {value!r}")
        return value


class TlsConfig(_Strict):
    """TLS towards the MQTT broker."""

    ca_certs: Path | None = Field(None, description="CA bundle that signed the broker's cert")
    certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    keyfile: Path | None = Field(None, description="client key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname and certificate checks")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        return self


class MqttConfig(_Strict):
    """Where events go."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("streamd", min_length=1, pattern=r"^[^#+\s]+$")
    client_id: str = Field("streamd", min_length=1, max_length=64)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="read the password from this file")
    tls: TlsConfig | None = None
    keepalive_s: int = Field(15, ge=5, le=3600)
    outbox_size: int = Field(10000, ge=1, le=10_000_000)
    ha_discovery: bool = True
    discovery_prefix: str = Field("homeassistant", min_length=1, pattern=r"^[^#+\s]+$")

    @model_validator(mode="after")
    def _credentials(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise ValueError("a password needs a username")
        return self


class MetricsConfig(_Strict):
    """The Prometheus endpoint."""

    listen: str = Field("127.0.0.1:9108", description='host:port of /metrics and /healthz; ""=off')

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, or None when disabled."""
        return parse_listen(self.listen) if self.listen else None


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


class StreamDefaults(_Strict):
    """Per-stream analysis settings; ``defaults`` holds them and every stream may override."""

    sample_fps: float = Field(1.0, gt=0, le=120, description="frames per second sent to the model")
    window_s: float = Field(8.0, gt=0, le=3600, description="window length")
    stride_s: float = Field(4.0, gt=0, le=3600, description="a window starts every stride_s")
    profile: Profile = "surveillance"
    system_prompt: str | None = Field(None, description="overrides the profile's system prompt")
    prompt: str | None = Field(None, description="overrides the profile's question")
    min_significance: int = Field(6, ge=1, le=10, description="events open at or above this")
    cooldown_s: float = Field(30.0, ge=0, le=86400, description="quiet time after an event ends")
    motion_gate: float = Field(0.0, ge=0, le=1, description="skip windows with less motion; 0=off")
    describe_below_min: bool = Field(
        True, description="also describe windows below min_significance (false saves the decode)"
    )
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="connecting to a source")
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="no data for this long = lost")

    @model_validator(mode="after")
    def _window_shape(self) -> StreamDefaults:
        if self.stride_s > self.window_s:
            raise ValueError(
                f"stride_s ({self.stride_s:g}) must not exceed window_s ({self.window_s:g})"
            )
        if self.window_s * self.sample_fps < 1:
            raise ValueError(
                f"window_s ({self.window_s:g}) at sample_fps ({self.sample_fps:g}) holds no frame;"
                " need window_s * sample_fps >= 1"
            )
        return self


class StreamConfig(StreamDefaults):
    """One video source, with every default resolved."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    url: Annotated[str, Field(min_length=1)]
    live: bool | Literal["auto"] = Field("auto", description="auto: files are not live")
    realtime: bool = Field(False, description="files only: read at 1x")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not STREAM_NAME_RE.match(value):
            raise ValueError(f"must match [a-z0-9_-]+, not {value!r}")
        return value

    @property
    def is_live(self) -> bool:
        """Whether the source is live (cameras, feeds) rather than a recorded file."""
        if self.live == "auto":
            return not is_file_url(self.url)
        return self.live


def is_file_url(url: str) -> bool:
    """True for a local file path (not a device, not a network URL)."""
    if "://" in url:
        return url.startswith("file://")
    return not url.startswith("/dev/video")


class Config(_Strict):
    """The whole validated configuration."""

    model: ModelConfig = ModelConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    defaults: StreamDefaults = StreamDefaults()
    streams: tuple[StreamConfig, ...]
    shutdown_timeout_s: float = Field(10.0, gt=0, le=600)


_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "mqtt": MqttConfig,
    "metrics": MetricsConfig,
    "defaults": StreamDefaults,
}


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute, validate. Raises ``ConfigError`` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from exc
    config = parse_config(raw, os.environ if environ is None else environ)
    return _read_secret_files(config, path.parent)


def parse_config(raw: object, environ: Mapping[str, str]) -> Config:
    """Validate an already-parsed YAML document (pure: no file or env access beyond ``environ``)."""
    problems: list[str] = []
    raw = _substitute(raw, environ, "", problems)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: must be a mapping, not {_kind(raw)}"])
    sections: dict[str, BaseModel] = {}
    for key in raw:
        if key not in (*_SECTIONS, "streams", "shutdown_timeout_s"):
            problems.append(f"{key}: unknown key")
    for key, model in _SECTIONS.items():
        value = raw.get(key)
        try:
            sections[key] = model.model_validate({} if value is None else value)
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, key))
    defaults = sections.get("defaults")
    base = defaults.model_dump() if isinstance(defaults, StreamDefaults) else {}
    streams = _parse_streams(raw.get("streams"), base, problems)
    if problems:
        raise ConfigError(problems)
    try:
        extra = {"shutdown_timeout_s": raw.get("shutdown_timeout_s", 10.0)}
        return Config.model_validate({**sections, "streams": streams, **extra})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "")) from exc


def _parse_streams(
    raw_streams: object, base: dict[str, object], problems: list[str]
) -> list[StreamConfig]:
    if raw_streams is None:
        problems.append("streams: field required")
        return []
    if not isinstance(raw_streams, list):
        problems.append(f"streams: must be a list, not {_kind(raw_streams)}")
        return []
    if not raw_streams:
        problems.append("streams: must list at least one stream")
    streams: list[StreamConfig] = []
    seen: dict[str, int] = {}
    for index, raw_stream in enumerate(raw_streams):
        where = f"streams[{index}]"
        if not isinstance(raw_stream, dict):
            problems.append(f"{where}: must be a mapping, not {_kind(raw_stream)}")
            continue
        try:
            stream = StreamConfig.model_validate({**base, **raw_stream})
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, where))
            continue
        if stream.name in seen:
            problems.append(
                f"{where}.name: duplicate stream name {stream.name!r}"
                f" (also streams[{seen[stream.name]}])"
            )
        seen.setdefault(stream.name, index)
        if stream.realtime and stream.is_live:
            problems.append(f"{where}.realtime: only applies to files, and this stream is live")
        streams.append(stream)
    return streams


def _substitute(
    value: object, environ: Mapping[str, str], where: str, problems: list[str]
) -> object:
    """Replace ``${VAR}`` in every string of the tree; an unset variable is a problem."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                problems.append(f"{where or '<root>'}: environment variable {name} is not set")
                return ""
            return environ[name]

        return ENV_RE.sub(replace, value)
    if isinstance(value, dict):
        return {
            key: _substitute(item, environ, _join(where, str(key)), problems)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_substitute(v, environ, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _read_secret_files(config: Config, base_dir: Path) -> Config:
    """Resolve ``*_file`` secrets (the only I/O after parsing)."""
    mqtt = config.mqtt
    if mqtt.password_file is None:
        return config
    secret_path = mqtt.password_file
    if not secret_path.is_absolute():
        secret_path = base_dir / secret_path
    try:
        secret = secret_path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([f"mqtt.password_file: cannot read {secret_path}: {reason}"]) from exc
    new_mqtt = mqtt.model_copy(update={"password": SecretStr(secret), "password_file": None})
    return config.model_copy(update={"mqtt": new_mqtt})


def format_validation_error(exc: ValidationError, prefix: str) -> list[str]:
    """One ``path.to[0].key: what is wrong`` line per pydantic error."""
    lines = []
    for error in exc.errors(include_url=False):
        path = prefix
        for part in error["loc"]:
            path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
        lines.append(f"{path or '<root>'}: {_message(error['type'], error['msg'])}")
    return lines


def _message(kind: str, msg: str) -> str:
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return "a list" if isinstance(value, list) else type(value).__name__


def summarize(config: Config) -> str:
    """The one-screen summary ``check-config`` prints."""
    model = config.model
    mqtt = config.mqtt
    lines = [
        f"model:   {model.id} (backend {model.backend}, device {model.device},"
        f" dtype {model.dtype})",
    ]
    if mqtt.enabled:
        auth = f" as {mqtt.username}" if mqtt.username else ""
        tls = " tls" if mqtt.tls else ""
        lines.append(
            f"broker:  {mqtt.host}:{mqtt.port}{tls}{auth}, prefix {mqtt.topic_prefix!r}, "
            f"HA discovery {'on' if mqtt.ha_discovery else 'off'}"
        )
    else:
        lines.append("broker:  disabled (events go to the log)")
    lines.append(f"metrics: {config.metrics.listen or 'disabled'}")
    lines.append(f"streams: {len(config.streams)}")
    for stream in config.streams:
        kind = "live" if stream.is_live else ("file, realtime" if stream.realtime else "file")
        lines.append(
            f"  {stream.name:<16} {redact_url(stream.url)} ({kind}; {stream.profile}, "
            f"{stream.window_s:g}s windows every {stream.stride_s:g}s"
            f" at {stream.sample_fps:g} fps, "
            f"events at >= {stream.min_significance})"
        )
    return "\n".join(lines)
