"""Loading SmolVLM2 with transformers: device, dtype, files and what scoring needs of them."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import huggingface_hub
import torch
from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils.tqdm import disable_progress_bars
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BaseImageProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging
from transformers.utils.hub import cached_file

from streamd.config import ModelConfig
from streamd.errors import ModelError
from streamd.log import adopt_library_loggers
from streamd.scoring.prompt import VideoTokens
from streamd.scoring.smolvlm import checkpoint as smolvlm
from streamd.scoring.smolvlm.checkpoint import SmolVLMFacts
from streamd.scoring.torch_cpu import amx_available

# transformers and huggingface_hub install handlers of their own: log through streamd's.
adopt_library_loggers()


@dataclass(frozen=True, slots=True)
class Checkpoint(SmolVLMFacts):
    """A loaded SmolVLM2 and what scoring needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    pad_token_id: int
    video_tokens: VideoTokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens as written (the prompt carries its own)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def synchronize(self) -> None:
        """Wait for queued device work, so stage timings are true on GPUs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


def load_checkpoint(config: ModelConfig) -> Checkpoint:
    """Load model, tokenizer and image processor; every failure is one ``ModelError`` line."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if not sys.stderr.isatty():  # a service's journal gets no progress bars
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        disable_progress_bars()
    model, tokenizer, image_processor, processor_file = _read_checkpoint(config.id, dtype)
    try:
        # transformers wraps nn.Module.to with functools.wraps: mypy sees the unbound signature.
        model.to(device)  # type: ignore[arg-type]
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ModelError(
            f"out of memory placing {config.id} on {device} ({dtype}): free memory,"
            " pick a smaller model or set model.device: cpu"
        ) from exc
    facts = smolvlm.read_facts(
        config.id,
        model.config,
        int(model.config.image_token_id),
        image_processor,
        smolvlm.declared_image_seq_len(processor_file),
        tokenizer,
        eos=(tokenizer.eos_token_id, model.generation_config.eos_token_id),
    )
    return Checkpoint(
        **facts.as_kwargs(),
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        video_tokens=VideoTokens(),
    )


def resolve_device(requested: str) -> torch.device:
    """``auto`` is CUDA, else MPS, else CPU; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(requested)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = (device.type == "cuda" and (device.index or 0) >= count) or (
        device.type == "mps" and not torch.backends.mps.is_available()
    )
    if missing:
        seen = f"{count} CUDA device(s)" if device.type == "cuda" else "no MPS device"
        raise ModelError(
            f"model.device is {requested} but torch {torch.__version__} sees {seen}:"
            " set model.device to auto or cpu"
        )
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the hardware runs it fast, else float32 (float16 on old GPUs)."""
    if requested != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(requested, torch.float32)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 pays on CPUs with AMX (3-4x faster than fp32). AVX512-BF16 alone is not enough:
    # measured on such a CPU (no AMX), bf16 vision and prefill took 1.6x fp32's time.
    if device.type == "cpu" and amx_available():
        return torch.bfloat16
    return torch.float32


def _read_checkpoint(
    model_id: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BaseImageProcessor, str | None]:
    """Local directory, else the Hugging Face cache, else a download (bounded by hub timeouts)."""
    directory = smolvlm.checkpoint_directory(model_id)
    source = str(directory) if directory is not None else model_id
    try:
        return _read_parts(model_id, source, local_only=True, dtype=dtype)
    except ModelError:
        raise
    except OSError as exc:  # not in the cache (or broken): only a hub id may go further
        if directory is not None:
            raise _load_error(model_id, exc) from exc
        if huggingface_hub.is_offline_mode():
            raise smolvlm.offline_error(model_id) from exc
    except Exception as exc:
        raise _load_error(model_id, exc) from exc
    try:
        return _read_parts(model_id, source, local_only=False, dtype=dtype)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_error(model_id, exc, downloading=True) from exc


def _read_parts(
    model_id: str, source: str, *, local_only: bool, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BaseImageProcessor, str | None]:
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    smolvlm.check_model_type(model_id, config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    # SmolVLMImageProcessorPil without torchvision, the torchvision one with it: same settings.
    image_processor = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
        source, local_files_only=local_only
    )
    processor_file = cached_file(
        source,
        "processor_config.json",
        local_files_only=local_only,
        _raise_exceptions_for_missing_entries=False,
    )
    model = AutoModelForImageTextToText.from_pretrained(
        source, config=config, dtype=dtype, local_files_only=local_only
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer, image_processor, processor_file


def _load_error(model_id: str, exc: BaseException, *, downloading: bool = False) -> ModelError:
    causes = _chain(exc)
    message = smolvlm.first_line(exc)
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return smolvlm.not_on_hub_error(model_id)
    if any(isinstance(cause, MemoryError | torch.OutOfMemoryError) for cause in causes):
        return ModelError(f"out of memory loading {model_id}: free memory or pick a smaller model")
    unreachable = any(
        isinstance(cause, ConnectionError | TimeoutError | OfflineModeIsEnabled) for cause in causes
    )
    if downloading and (unreachable or "connect" in message.lower()):
        return ModelError(
            f"cannot download {model_id}: the Hugging Face hub is unreachable;"
            f" {smolvlm.download_hint(model_id)}"
        )
    return ModelError(f"cannot load {model_id}: {message}")


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found
