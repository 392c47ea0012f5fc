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

from streamd.scoring.local_config import DTYPES, VISION_QUANTIZE, ModelConfig
from streamd.scoring.openai_config import OpenAIModelConfig


@dataclass(frozen=True, slots=True)
class CliOption:
    """A ``streamd analyze`` flag that sets one key of a backend's ``model:`` section.

    Attributes:
        flag: The flag (``--base-url``); its argparse dest is the key.
        key: The config key it sets (``base_url``).
        help: One line for ``--help``.
        metavar: Shown in ``--help``.
        choices: The values it takes, if a fixed list.
    """

    flag: str
    key: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


LOCAL_OPTIONS = (
    CliOption("--device", "device", "auto | cuda | cuda:N | mps | cpu", "DEVICE"),
    CliOption("--dtype", "dtype", "auto picks from the hardware", choices=DTYPES),
    CliOption("--threads", "threads", "torch CPU threads (default: the usable cores)", "N"),
    CliOption(
        "--vision-quantize",
        "vision_quantize",
        "int8: faster vision on CPU, float32 only (default none)",
        choices=VISION_QUANTIZE,
    ),
)
REMOTE_OPTIONS = (
    CliOption("--base-url", "base_url", "the server's API root, e.g. http://gpu:8000/v1", "URL"),
    CliOption("--api-key-file", "api_key_file", "default: $OPENAI_API_KEY, if set", "FILE"),
    CliOption("--max-in-flight", "max_in_flight", "requests open at once (default 8)", "N"),
)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend.

    Attributes:
        config: The pydantic model of its ``model:`` section (``backend`` is its tag).
        factory: ``module:Class`` of the backend; the class takes that config.
        install_hint: What to install when the module cannot be imported.
        options: Its own ``analyze`` flags (``--model`` and ``--max-new-tokens`` are everyone's).
    """

    config: type[BaseModel]
    factory: str
    install_hint: str
    options: tuple[CliOption, ...] = LOCAL_OPTIONS


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
        REMOTE_OPTIONS,
    ),
}
AUTO = "auto"
"""Not a backend: mlx on Apple Silicon with mlx-vlm installed, else transformers."""
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)


def spec_of(name: str) -> BackendSpec:
    """The spec behind a ``backend`` value (``auto`` takes the local backends' options)."""
    return BACKENDS["transformers" if name == AUTO else name]


def cli_options() -> dict[str, tuple[CliOption, list[str]]]:
    """Every backend flag once, with the backends that take it, in registry order."""
    found: dict[str, tuple[CliOption, list[str]]] = {}
    for name, spec in BACKENDS.items():
        for option in spec.options:
            found.setdefault(option.flag, (option, []))[1].append(name)
    return found
