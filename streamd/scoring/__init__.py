"""Backends by name (``registry.BACKENDS``), imported lazily so ``import streamd`` stays light."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from typing import TYPE_CHECKING

from streamd.errors import ModelError
from streamd.scoring.base import ScoringBackend
from streamd.scoring.registry import AUTO, BACKENDS

if TYPE_CHECKING:
    from streamd.config import ModelSection


def resolve_backend_name(name: str) -> str:
    """``auto`` -> ``mlx`` on Apple Silicon with mlx-vlm installed, else ``transformers``."""
    if name != AUTO:
        return name
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple_silicon and importlib.util.find_spec("mlx_vlm") is not None:
        return "mlx"
    return "transformers"


def create_backend(config: ModelSection) -> ScoringBackend:
    """Instantiate (not load) the backend ``config.backend`` names."""
    name = resolve_backend_name(config.backend)
    spec = BACKENDS[name]
    module_name, _, class_name = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = spec.install_hint or "reinstall streamd"
        raise ModelError(f"backend {name!r} is not installed ({exc.name or exc}): {hint}") from exc
    backend: ScoringBackend = getattr(module, class_name)(config)
    return backend
