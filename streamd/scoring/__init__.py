"""Backends by name, imported lazily so ``import streamd`` never pulls torch or mlx."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

from streamd.config import ModelConfig
from streamd.errors import ModelError
from streamd.scoring.base import ScoringBackend

BACKENDS: dict[str, str] = {
    "transformers": "streamd.scoring.transformers_impl:TransformersBackend",
    "mlx": "streamd.scoring.mlx_impl:MlxBackend",
    "motion": "streamd.scoring.motion_impl:MotionBackend",
}


def resolve_backend_name(name: str) -> str:
    """``auto`` -> ``mlx`` on Apple Silicon with mlx-vlm installed, else ``transformers``."""
    if name != "auto":
        return name
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple_silicon and importlib.util.find_spec("mlx_vlm") is not None:
        return "mlx"
    return "transformers"


def create_backend(config: ModelConfig) -> ScoringBackend:
    """Instantiate (not load) the backend ``config.backend`` names."""
    name = resolve_backend_name(config.backend)
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = {
            "transformers": "pip install torch==2.13.0 transformers (see README)",
            "mlx": "pip install 'streamd[mlx]' (Apple Silicon only)",
        }.get(name, "reinstall streamd")
        raise ModelError(f"backend {name!r} is not installed ({exc.name or exc}): {hint}") from exc
    backend: ScoringBackend = getattr(module, class_name)(config)
    return backend
