"""The ``model:`` section when ``backend: openai``: a server speaking OpenAI's chat API (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    JsonValue,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streamd.errors import ModelError
from streamd.log import redact_url
from streamd.sections import DEFAULT_MODEL_ID, Section, resolve_path

API_KEY_ENV = "OPENAI_API_KEY"
"""Where the key comes from when the config names none, as in OpenAI's own tools."""
STALL_MARGIN_S = 10.0
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
"""vLLM's and SGLang's default address."""


class OpenAIModelConfig(Section):
    """Which model scores the windows when inference runs on an OpenAI-compatible server."""

    backend: Literal["openai"] = Field("openai", description="remote inference over HTTP")
    id: str = Field(
        DEFAULT_MODEL_ID, min_length=1, description="the model name as the server lists it"
    )
    base_url: str = Field(
        DEFAULT_BASE_URL, description="the server's API root, ending in /v1 for most servers"
    )
    api_key: SecretStr | None = Field(
        None, description="bearer key; prefer api_key_file or $OPENAI_API_KEY"
    )
    api_key_file: Path | None = Field(
        None, description="file holding the key (systemd LoadCredential)"
    )
    max_in_flight: int = Field(
        8, ge=1, le=256, description="requests open at once (the server batches them)"
    )
    timeout_s: float = Field(60.0, gt=0, le=3600, description="one request, retries included")
    extra_body: dict[str, JsonValue] = Field(
        default_factory=dict, description="merged into every request verbatim (server knobs)"
    )
    max_new_tokens: int = Field(64, ge=1, le=1024, description="longest answer, in tokens")
    continue_final_message: bool = Field(
        False,
        description=(
            "the server continues a started assistant message (vLLM, SGLang, llama.cpp): a"
            " window that needs a description continues its score's answer"
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, not {redact_url(value)!r}")
        return value

    @field_validator("api_key_file")
    @classmethod
    def _relative(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @property
    def stall_timeout_s(self) -> float:
        """A model call longer than this stalls the runner (a request, plus JPEG encoding)."""
        return self.timeout_s + STALL_MARGIN_S

    def summary(self) -> str:
        """One line for ``check-config`` (the key never shows)."""
        key = "api key set" if self.api_key or self.api_key_file else "no api key"
        return (
            f"{self.id} (backend openai at {redact_url(self.base_url)},"
            f" max_in_flight {self.max_in_flight}, {key})"
        )

    @model_validator(mode="after")
    def _one_key(self) -> OpenAIModelConfig:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self


def resolve_api_key(config: OpenAIModelConfig, environ: Mapping[str, str]) -> SecretStr | None:
    """The key: ``api_key``, else the first line of ``api_key_file``, else ``$OPENAI_API_KEY``.

    Raises:
        ModelError: ``api_key_file`` cannot be read or is empty.
    """
    if config.api_key is not None:
        return config.api_key
    if config.api_key_file is not None:
        try:
            text = config.api_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(
                f"cannot read model.api_key_file {config.api_key_file}: {exc.strerror or exc}"
            ) from None
        key = (text.strip().splitlines() or [""])[0].strip()
        if not key:
            raise ModelError(f"model.api_key_file {config.api_key_file} is empty")
        return SecretStr(key)
    from_env = environ.get(API_KEY_ENV, "").strip()
    return SecretStr(from_env) if from_env else None
