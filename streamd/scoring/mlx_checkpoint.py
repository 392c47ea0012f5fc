"""Loading SmolVLM2 with mlx-vlm: files, weights and what scoring needs of them (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import huggingface_hub
import mlx.core as mx
import mlx_vlm
import numpy as np
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from mlx import nn

from streamd.config import ModelConfig
from streamd.errors import ModelError
from streamd.log import adopt_library_loggers
from streamd.scoring.smolvlm import checkpoint as smolvlm
from streamd.scoring.smolvlm.checkpoint import Normalization, SmolVLMFacts

# transformers and huggingface_hub install handlers of their own: log through streamd's.
adopt_library_loggers()

# What mlx_vlm.load fetches from the hub (its own list, minus code and sentencepiece files).
_HUB_FILES = ["*.json", "*.jsonl", "*.safetensors", "*.txt", "*.jinja"]


class _Tokenizer(Protocol):
    """The part of the transformers tokenizer (``processor.tokenizer``) used here."""

    eos_token_id: int | None

    def __len__(self) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def batch_decode(self, ids: list[list[int]]) -> list[str]: ...
    def convert_tokens_to_ids(self, token: str) -> int: ...


@dataclass(frozen=True, slots=True)
class MlxCheckpoint(SmolVLMFacts):
    """A loaded SmolVLM2 and what scoring needs to know about it."""

    model: nn.Module
    tokenizer: _Tokenizer


def load_checkpoint(config: ModelConfig) -> MlxCheckpoint:
    """Load model, tokenizer and image settings; every failure is one ``ModelError`` line."""
    directory = local_directory(config.id)
    smolvlm.check_model_type(config.id, _read_json(directory / "config.json").get("model_type"))
    try:
        model, processor = mlx_vlm.load(str(directory))
    except Exception as exc:
        raise ModelError(
            f"cannot load {config.id} with mlx-vlm {mlx_vlm.__version__}: {smolvlm.first_line(exc)}"
        ) from exc
    if config.dtype != "auto":
        model.set_dtype(getattr(mx, config.dtype))
    tokenizer: _Tokenizer = processor.tokenizer
    generation = _read_json(directory / "generation_config.json")
    facts = smolvlm.read_facts(
        config.id,
        model.config,
        int(model.config.image_token_index),
        processor.image_processor,
        smolvlm.declared_image_seq_len(directory / "processor_config.json"),
        tokenizer,
        eos=(tokenizer.eos_token_id, model.config.eos_token_id, generation.get("eos_token_id")),
    )
    _check_normalization(config.id, facts.normalization)
    return MlxCheckpoint(**facts.as_kwargs(), model=model, tokenizer=tokenizer)


def local_directory(model_id: str) -> Path:
    """The checkpoint directory: ``model_id`` itself, else its Hugging Face snapshot."""
    path = smolvlm.checkpoint_directory(model_id)
    if path is not None:
        return path
    try:
        return Path(
            huggingface_hub.snapshot_download(
                model_id, allow_patterns=_HUB_FILES, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        if huggingface_hub.is_offline_mode():
            raise smolvlm.offline_error(model_id) from None
    try:
        return Path(huggingface_hub.snapshot_download(model_id, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError as exc:
        raise smolvlm.not_on_hub_error(model_id) from exc
    except Exception as exc:
        raise ModelError(
            f"cannot download {model_id}: {type(exc).__name__}; {smolvlm.download_hint(model_id)}"
        ) from exc


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _check_normalization(model_id: str, normalization: Normalization) -> None:
    # mlx-vlm drops all-zero pixel values as batch padding: a frame of one colour must not be 0.
    mean = np.asarray(normalization.mean, np.float32)
    std = np.asarray(normalization.std, np.float32)
    rescale = np.float32(normalization.rescale_factor)
    levels = (np.arange(256, dtype=np.float32)[:, None] * rescale - mean) / std
    if (levels == 0).any(axis=0).all():
        raise ModelError(
            f"{model_id}: its image normalization maps a plain frame to zeros, which mlx-vlm drops"
        )
