"""What every config section shares: strict frozen models and config-relative paths (pure)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo

BASE_DIR = "base_dir"
"""Validation-context key: the directory relative paths are resolved against."""
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected, defaults validated, finite numbers."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )


def resolve_path(path: Path, info: ValidationInfo) -> Path:
    """``path`` made absolute against the config file's directory (when there is one)."""
    base = (info.context or {}).get(BASE_DIR)
    path = path.expanduser()
    if base is None or path.is_absolute():
        return path
    return Path(base) / path
