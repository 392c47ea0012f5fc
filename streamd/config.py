"""Configuration schema and loader: YAML -> validated, frozen ``Config``.

The file's shape is defined here once, as pydantic models: ``Config`` is the root and each
section is one model, so adding a section means adding one model and one field. Validation is
pydantic's own, so every problem of a file is reported in one go, one line each
(``streams[1].url: field required``). ``defaults:`` is merged into each stream by one
``mode="before"`` validator. Parsing is pure (``parse_config``); ``load_config`` adds the
I/O: reading the file, the environment, and checking the files it names.

Relative paths (a stream's file, ``password_file``, TLS files) are relative to the config
file's directory, as users of systemd units expect, never to the current directory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union, get_args

import yaml
from pydantic import (
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streamd.errors import ConfigError
from streamd.log import redact_url
from streamd.review_config import MIN_TOKEN_CHARS, HttpConfig, StorageConfig, parse_listen
from streamd.scoring.local_config import DTYPES, Dtype, ModelConfig
from streamd.scoring.openai_config import OpenAIModelConfig
from streamd.scoring.registry import AUTO, BACKEND_CHOICES, BACKENDS
from streamd.sections import BASE_DIR, DEFAULT_MODEL_ID, Section, resolve_path

STREAM_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
ENV_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})"
)
"""``${VAR}``, ``${VAR:-default}`` (unset or empty: the default) and ``$$`` (a literal ``$``)."""
MAX_WINDOW_FRAMES = 256
"""Most sampled frames one window may hold: each is held at the model's input size (~0.8 MB at
512x512 RGB), and SmolVLM2 itself was trained on at most 64 frames per video."""
FRAME_BYTES = 512 * 512 * 3

# Choice lists: defined once here, read everywhere else with ``typing.get_args``.
Profile = Literal["highlights", "sports", "surveillance", "scene", "technical"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
BACKEND_NAMES: tuple[str, ...] = BACKEND_CHOICES
PROFILES: tuple[str, ...] = get_args(Profile)
MOTION_GATE_AUTO: dict[str, float] = {"surveillance": 0.0003}
"""What ``motion_gate: auto`` (the default) means per profile; a profile not listed: 0, off.

surveillance: a window is skipped when no two consecutive samples differ in more than one cell
of the 64x64 motion grid (0.024% of the picture). bench/motion_gate.py: 12.5x fewer model calls
on 25 min of static footage with 7 scripted events, none missed (the faintest, a distant person
at night, changes 3 cells); a tree in the wind keeps every window open (README, Motion gate)."""
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)

__all__ = [
    "BASE_DIR",
    "DEFAULT_MODEL_ID",
    "DTYPES",
    "Dtype",
    "ModelConfig",
    "ModelSection",
    "OpenAIModelConfig",
]


def _backend_tag(data: object) -> str:
    """The ``model:`` section's tag: its ``backend`` (``auto`` when not given)."""
    if isinstance(data, dict):
        return str(data.get("backend", AUTO))
    return str(getattr(data, "backend", AUTO))


if TYPE_CHECKING:
    ModelSection = ModelConfig | OpenAIModelConfig
else:
    # One member per backend name, from the registry: adding a backend adds no line here.
    ModelSection = Annotated[
        Union[  # noqa: UP007 - built at run time from the registry
            tuple(
                Annotated[spec.config, Tag(name)]
                for name, spec in {AUTO: BACKENDS["transformers"], **BACKENDS}.items()
            )
        ],
        Discriminator(_backend_tag),
    ]


class TlsConfig(Section):
    """TLS towards the MQTT broker."""

    ca_certs: Path | None = Field(None, description="CA bundle that signed the broker's cert")
    certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    keyfile: Path | None = Field(None, description="client key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname and certificate checks")

    @field_validator("ca_certs", "certfile", "keyfile")
    @classmethod
    def _relative(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        return self


class MqttConfig(Section):
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

    @field_validator("password_file")
    @classmethod
    def _relative(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _credentials(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise ValueError("a password needs a username")
        return self


class MetricsConfig(Section):
    """``metrics``: kept for ``listen``, an alias of ``http.listen`` (v1 files)."""

    listen: str | None = Field(None, description='alias of http.listen; ""=off')

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value:
            parse_listen(value)
        return value


class StreamDefaults(Section):
    """Per-stream analysis settings; ``defaults`` holds them and every stream may override."""

    sample_fps: float = Field(1.0, gt=0, le=120, description="frames per second sent to the model")
    window_s: float = Field(8.0, gt=0, le=3600, description="window length")
    stride_s: float = Field(4.0, gt=0, le=3600, description="a window starts every stride_s")
    profile: Profile = "surveillance"
    system_prompt: str | None = Field(None, description="overrides the profile's system prompt")
    prompt: str | None = Field(None, description="overrides the profile's question")
    min_significance: int = Field(6, ge=1, le=10, description="events open at or above this")
    cooldown_s: float = Field(30.0, ge=0, le=86400, description="quiet time after an event ends")
    motion_gate: float = Field(
        "auto",
        ge=0,
        le=1,
        validate_default=True,
        description="skip windows with less motion: 0-1 (0=off), or auto: the profile's gate",
    )
    describe_below_min: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "describe windows below min_significance too: true, false (saves the decode), or"
            " auto: when no other window waits for the model"
        ),
    )
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="connecting to a source")
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="no data for this long = lost")

    @field_validator("motion_gate", mode="before")
    @classmethod
    def _gate_or_auto(cls, value: object, info: ValidationInfo) -> object:
        """``auto`` becomes the profile's gate, so the rest of the code sees a number."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value  # bounds are the field's
        text = str(value).strip().lower() if isinstance(value, str) else ""
        if text == "auto":
            # No valid profile: its own error is listed, and the gate does not matter then.
            return MOTION_GATE_AUTO.get(str(info.data.get("profile")), 0.0)
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"must be a number from 0 to 1 (0 = off) or auto, not {value!r}"
            ) from None

    @field_validator("describe_below_min", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        if value == "auto" or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "false"):
            return text == "true"
        raise ValueError(f"must be auto, true or false, not {value!r}")

    @model_validator(mode="after")
    def _window_shape(self) -> StreamDefaults:
        if self.stride_s > self.window_s:
            raise ValueError(
                f"stride_s ({self.stride_s:g}) must not exceed window_s ({self.window_s:g})"
            )
        frames = self.window_s * self.sample_fps
        if frames < 1:
            raise ValueError(
                f"window_s ({self.window_s:g}) at sample_fps ({self.sample_fps:g}) holds no frame;"
                " need window_s * sample_fps >= 1"
            )
        if frames > MAX_WINDOW_FRAMES:
            need_gb = math.ceil(frames) * FRAME_BYTES / 1e9
            raise ValueError(
                f"window_s ({self.window_s:g}) x sample_fps ({self.sample_fps:g}) ="
                f" {frames:g} frames per window, over the limit of {MAX_WINDOW_FRAMES}"
                f" (holding them would take {need_gb:.3g} GB); lower window_s or sample_fps"
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

    @field_validator("url")
    @classmethod
    def _relative_file(cls, value: str, info: ValidationInfo) -> str:
        if is_file_url(value) and not value.startswith("file://"):
            return str(resolve_path(Path(value), info))
        return value

    @model_validator(mode="after")
    def _realtime_files_only(self) -> StreamConfig:
        if self.realtime and self.is_live:
            raise ValueError("realtime: only applies to files, and this stream is live")
        return self

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


class Config(Section):
    """The whole validated configuration: one field per section."""

    model: ModelSection = Field(default_factory=ModelConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    defaults: StreamDefaults = Field(default_factory=StreamDefaults)
    streams: tuple[StreamConfig, ...] = Field(min_length=1)
    shutdown_timeout_s: float = Field(10.0, gt=0, le=600)

    @model_validator(mode="before")
    @classmethod
    def _inherit_defaults(cls, data: object, info: ValidationInfo) -> object:
        """Every stream starts from ``defaults:``; an empty section means its defaults.

        ``defaults:`` is merged only when it is valid itself, so its errors are listed once.
        """
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None or key == "streams"}
        defaults, streams = data.get("defaults", {}), data.get("streams")
        if not (isinstance(defaults, dict) and isinstance(streams, list)):
            return data
        try:
            StreamDefaults.model_validate(defaults, context=info.context)
        except ValidationError:
            return data
        data["streams"] = [
            {**defaults, **stream} if isinstance(stream, dict) else stream for stream in streams
        ]
        return data

    @model_validator(mode="before")
    @classmethod
    def _metrics_alias(cls, data: object) -> object:
        """``metrics.listen`` (v1) is ``http.listen``; both set and different is an error."""
        if not isinstance(data, dict):
            return data
        metrics, http = data.get("metrics"), data.get("http")
        if not isinstance(metrics, dict) or "listen" not in metrics:
            return data
        if http is None:
            http = {}
        if not isinstance(http, dict):
            return data
        alias = metrics["listen"]
        if "listen" in http and http["listen"] != alias:
            raise ValueError(
                "metrics.listen is an alias of http.listen and they differ: keep http.listen"
            )
        return {**data, "http": {**http, "listen": alias}}

    @field_validator("streams")
    @classmethod
    def _unique_names(cls, streams: tuple[StreamConfig, ...]) -> tuple[StreamConfig, ...]:
        seen: dict[str, int] = {}
        for index, stream in enumerate(streams):
            if stream.name in seen:
                raise ValueError(
                    f"duplicate stream name {stream.name!r}"
                    f" (streams[{seen[stream.name]}] and streams[{index}])"
                )
            seen[stream.name] = index
        return streams


# --- loading -----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute, validate, check the files it names. Raises ``ConfigError``."""
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
    env = os.environ if environ is None else environ
    config = parse_config(raw, env, base_dir=path.resolve().parent)
    return _read_files(config)


def parse_config(raw: object, environ: Mapping[str, str], base_dir: Path | None = None) -> Config:
    """Validate an already-parsed YAML document (pure: no file or env access beyond ``environ``).

    Args:
        raw: The YAML document.
        environ: Where ``${VAR}`` comes from.
        base_dir: Relative paths are resolved against this (the config file's directory);
            None leaves them as written.
    """
    problems: list[str] = []
    raw = _substitute(raw, environ, "", problems)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: must be a mapping, not {_kind(raw)}"])
    context = {BASE_DIR: base_dir} if base_dir is not None else None
    try:
        config = Config.model_validate(raw, context=context)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, ""))
        raise ConfigError(problems) from exc
    if problems:
        raise ConfigError(problems)
    return config


def _substitute(
    value: object, environ: Mapping[str, str], where: str, problems: list[str]
) -> object:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``$$`` in every string of the tree."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match["escaped"]:
                return "$"
            name, default = match["name"], match["default"]
            if default is not None:
                return environ.get(name) or default
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


def _read_files(config: Config) -> Config:
    """Check the files the config names and read its ``*_file`` secrets (the only I/O).

    A missing CA bundle would otherwise pass and then fail every connection attempt forever
    with an error that names no file.
    """
    mqtt = config.mqtt
    problems: list[str] = []
    if mqtt.enabled and mqtt.tls is not None:
        for key in ("ca_certs", "certfile", "keyfile"):
            tls_path: Path | None = getattr(mqtt.tls, key)
            if tls_path is not None:
                _check_readable(tls_path, f"mqtt.tls.{key}", problems)
    secret: str | None = None
    if mqtt.password_file is not None:
        secret = _read_secret(mqtt.password_file, "mqtt.password_file", problems)
    token: str | None = None
    if config.http.auth_token_file is not None:
        token = _read_secret(config.http.auth_token_file, "http.auth_token_file", problems)
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            problems.append(
                f"http.auth_token_file: the token must be at least {MIN_TOKEN_CHARS}"
                " characters (e.g. `openssl rand -hex 16`)"
            )
    if problems:
        raise ConfigError(problems)
    update: dict[str, object] = {}
    if secret is not None:
        update["mqtt"] = mqtt.model_copy(
            update={"password": SecretStr(secret), "password_file": None}
        )
    if token is not None:
        update["http"] = config.http.model_copy(
            update={"auth_token": SecretStr(token), "auth_token_file": None}
        )
    return config.model_copy(update=update) if update else config


def _check_readable(path: Path, key: str, problems: list[str]) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror or exc}")


def _read_secret(path: Path, key: str, problems: list[str]) -> str | None:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        problems.append(f"{key}: {path} is not UTF-8 text")
    return None


# --- errors and the summary --------------------------------------------------------------------


def format_validation_error(exc: ValidationError, prefix: str) -> list[str]:
    """One ``path.to[0].key: what is wrong`` line per pydantic error."""
    lines = []
    for error in exc.errors(include_url=False):
        path = prefix
        loc = error["loc"]
        if len(loc) > 1 and loc[0] == "model" and loc[1] in BACKEND_CHOICES:
            loc = (loc[0], *loc[2:])  # the union's tag is not a key of the file
        elif loc and loc[0] in BACKEND_CHOICES:
            loc = loc[1:]  # the same, for the model section validated on its own
        if error["type"] == "union_tag_invalid":
            loc = (*loc, "backend")
        for part in loc:
            path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
        value = error.get("input")
        if error["type"] == "too_short" and value:
            continue  # only says that an item failed, and that item's error is listed
        message = _message(error["type"], error["msg"], value)
        lines.append(f"{path or '<root>'}: {message}")
    return lines


_FIXED_MESSAGES = {"missing": "field required", "extra_forbidden": "unknown key"}


def _message(kind: str, msg: str, value: object) -> str:
    if kind in _FIXED_MESSAGES:
        return _FIXED_MESSAGES[kind]
    if kind == "union_tag_invalid":
        return f"must be one of {', '.join(BACKEND_CHOICES)}, not {_backend_tag(value)!r}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, not {_kind(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping, not {_kind(value)}"
    if kind == "too_short" and isinstance(value, list | tuple) and not value:
        return "must list at least one stream"
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def summarize(config: Config) -> str:
    """The one-screen summary ``check-config`` prints."""
    model = config.model
    mqtt = config.mqtt
    lines = [f"model:   {model.summary()}"]
    if mqtt.enabled:
        auth = f" as {mqtt.username}" if mqtt.username else ""
        tls = " tls" if mqtt.tls else ""
        lines.append(
            f"broker:  {mqtt.host}:{mqtt.port}{tls}{auth}, prefix {mqtt.topic_prefix!r}, "
            f"HA discovery {'on' if mqtt.ha_discovery else 'off'}"
        )
    else:
        lines.append("broker:  disabled (events go to the log)")
    http = config.http
    if http.address is None:
        lines.append("http:    disabled")
    else:
        auth = "bearer token" if http.token() is not None else "no auth (loopback only)"
        lines.append(f"http:    http://{http.listen}/ (page, /api, /metrics, /healthz; {auth})")
    if config.metrics.listen is not None:
        lines.append("         (metrics.listen is an alias of http.listen: rename it)")
    storage = config.storage
    if storage.dir is None:
        lines.append("storage: off (events held in memory only; no clips)")
    else:
        lines.append(
            f"storage: {storage.dir} (keep {storage.retain_days:g} days, at most"
            f" {storage.max_gb:g} GB; clips {storage.pre_roll_s:g}s before,"
            f" {storage.post_roll_s:g}s after)"
        )
    lines.append(f"streams: {len(config.streams)}")
    for stream in config.streams:
        kind = "live" if stream.is_live else ("file, realtime" if stream.realtime else "file")
        lines.append(
            f"  {stream.name:<16} {redact_url(stream.url)} ({kind}; {stream.profile}, "
            f"{stream.window_s:g}s windows every {stream.stride_s:g}s"
            f" at {stream.sample_fps:g} fps, "
            f"events at >= {stream.min_significance}, {motion_gate_summary(stream)})"
        )
    return "\n".join(lines)


def motion_gate_summary(stream: StreamDefaults) -> str:
    """``motion gate 0.0003 (profile default)``, ``motion gate 0.01`` or ``motion gate off``."""
    if stream.motion_gate == 0:
        return "motion gate off"
    default = MOTION_GATE_AUTO.get(stream.profile) == stream.motion_gate
    return f"motion gate {stream.motion_gate:g}{' (profile default)' if default else ''}"
