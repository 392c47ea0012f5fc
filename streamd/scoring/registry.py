"""Backends by name: each one's config model, factory and install hint (pure, no heavy import).

Adding a backend is one module (its class, and its config model if it needs its own keys) and
one line here: the ``model:`` section's union, the CLI's ``--backend`` choices, check-config's
summary and the conformance tests all read this table. Factories are import strings, imported
only when used (uvicorn's ``LOOP_SETUPS``, vLLM's model registry), so ``import streamd`` never
pulls torch, mlx or httpx.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from streamd.scoring.local_config import ModelConfig
from streamd.scoring.openai_config import OpenAIModelConfig


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend.

    Attributes:
        config: The pydantic model of its ``model:`` section (``backend`` is its tag).
        factory: ``module:Class`` of the backend; the class takes that config.
        install_hint: What to install when the module cannot be imported.
    """

    config: type[BaseModel]
    factory: str
    install_hint: str


BACKENDS: dict[str, BackendSpec] = {
    "transformers": BackendSpec(
        ModelConfig,
        "streamd.scoring.transformers_impl:TransformersBackend",
        "pip install torch==2.13.0 transformers (see README)",
    ),
    "mlx": BackendSpec(
        ModelConfig,
        "streamd.scoring.mlx_impl:MlxBackend",
        "pip install 'streamd[mlx]' (Apple Silicon only)",
    ),
    "motion": BackendSpec(ModelConfig, "streamd.scoring.motion_impl:MotionBackend", ""),
    "openai": BackendSpec(
        OpenAIModelConfig,
        "streamd.scoring.openai_impl:OpenAIBackend",
        "pip install httpx",
    ),
}
AUTO = "auto"
"""Not a backend: mlx on Apple Silicon with mlx-vlm installed, else transformers."""
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)
