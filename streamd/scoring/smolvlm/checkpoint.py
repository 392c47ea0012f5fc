"""SmolVLM2 checkpoint facts and window helpers shared by the transformers and mlx backends.

Neither torch nor mlx: the mlx backend must import without torch and the transformers one
without mlx. Where the backends read a fact from different objects (a transformers tokenizer,
mlx-vlm's processor, a JSON file), the functions here take the plain values or callables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from streamd import motion
from streamd.config import DEFAULT_MODEL_ID
from streamd.domain import Frame, ScoreRequest, Window
from streamd.errors import ModelError
from streamd.scoring.prompt import (
    ANSWER_PREFIX,
    DESCRIPTION_PREFIX,
    PROFILES,
    VideoTokens,
    render_video_prompt,
)

DEFAULT_MIN_DIGIT_MASS = 0.5
"""Below this probability of a digit right after the prefix, the model is not giving a number:
let it answer in free text and parse that, rather than force a digit out of it."""
FREE_TEXT_EXTRA_TOKENS = 8
"""Free-text answers also spend tokens on the score and "Description:"."""
WARM_UP_STREAM = "<warm-up>"
"""Not a valid stream name, so it never collides with a real stream's cached frames."""
NORMALIZATION_SETTINGS = ("rescale_factor", "do_rescale", "do_normalize", "image_mean", "image_std")
"""The image processor settings ``normalization_from`` reads."""

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VIDEO_TOKENS = VideoTokens()
_T = TypeVar("_T")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, else its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def loaded(part: _T | None, model_id: str) -> _T:
    """``part`` of a loaded model; ``ModelError`` while it is None (before ``load``)."""
    if part is None:
        raise ModelError(f"{model_id} is not loaded: call load() first")
    return part


# --- where the checkpoint is ---------------------------------------------------------------------


def checkpoint_directory(model_id: str) -> Path | None:
    """``model_id`` as a local checkpoint directory, or None for a hub id.

    Raises:
        ModelError: A directory without ``config.json``, a file, or neither a directory nor a
            hub id.
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{model_id} has no config.json: set model.id to a SmolVLM2 checkpoint"
            )
        return path
    if path.exists():
        raise ModelError(
            f"{model_id} is a file, not a model directory: set model.id to a SmolVLM2 checkpoint"
            f" directory or a hub id such as {DEFAULT_MODEL_ID}"
        )
    if not _HUB_ID_RE.match(model_id):
        raise ModelError(
            f"model directory {model_id} does not exist: set model.id to a SmolVLM2 checkpoint"
            f" directory or a hub id such as {DEFAULT_MODEL_ID}"
        )
    return None


def check_model_type(model_id: str, model_type: object) -> None:
    """Raise ``ModelError`` unless ``config.json``'s ``model_type`` is SmolVLM's."""
    if model_type != "smolvlm":
        raise ModelError(
            f"{model_id} is a {model_type!r} checkpoint, not SmolVLM2: set model.id to"
            f" a SmolVLM2 checkpoint such as {DEFAULT_MODEL_ID}"
        )


def download_hint(model_id: str) -> str:
    """How to bring a checkpoint to a machine that cannot reach the hub."""
    return (
        f"download it where the hub is reachable (`hf download {model_id} --local-dir DIR`),"
        " copy DIR here and set model.id to it"
    )


def offline_error(model_id: str) -> ModelError:
    """A hub id that is not cached while the hub is off."""
    return ModelError(
        f"{model_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set:"
        f" {download_hint(model_id)}"
    )


def not_on_hub_error(model_id: str) -> ModelError:
    """A hub id the hub does not know (or hides without a login)."""
    return ModelError(
        f"{model_id} is not on the Hugging Face hub (or needs a login): check model.id"
    )


# --- what the checkpoint says ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Normalization:
    """How the checkpoint's image processor maps uint8 pixels to model inputs."""

    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class DigitTokens:
    """How the tokenizer writes a score after the answer prefix.

    Attributes:
        lead: Text between the prefix and the digits that the tokenizer keeps apart from
            them (" " for SmolLM's tokenizer, whose ``Digits`` pre-tokenizer splits "Ġ8").
        digit_ids: Token ids of "0" to "9".
        description_ids: Tokens of ``DESCRIPTION_PREFIX`` after a digit.
    """

    lead: str
    digit_ids: tuple[int, ...]
    description_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SmolVLMFacts:
    """What scoring needs to know about a checkpoint; each backend's checkpoint extends it."""

    image_side: int
    """Frames are squashed to this square (the vision encoder's input)."""
    image_seq_len: int
    image_token_id: int
    normalization: Normalization
    digits: DigitTokens | None
    """How scores are read from logits; None when the tokenizer forces free text."""
    stop_ids: frozenset[int]
    """<end_of_utterance> and EOS."""
    newline_ids: frozenset[int]
    """Tokens whose text holds a newline: a description is one line."""

    def as_kwargs(self) -> dict[str, Any]:
        """These facts as keyword arguments, to build a backend's checkpoint from them."""
        return {field.name: getattr(self, field.name) for field in fields(SmolVLMFacts)}


class Tokenizer(Protocol):
    """What is read of a transformers tokenizer (which mlx-vlm's processor also holds)."""

    def __len__(self) -> int: ...
    def encode(self, text: str, /, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""

    def convert_tokens_to_ids(self, token: str, /) -> object:
        """The id of one token."""

    def batch_decode(self, sequences: list[list[int]], /) -> list[str]:
        """The text of each sequence."""


def read_facts(
    model_id: str,
    model_config: Any,
    image_token_id: int,
    image_processor: object,
    declared_seq_len: int | None,
    tokenizer: Tokenizer,
    eos: Sequence[object],
) -> SmolVLMFacts:
    """Check that config, image processor and tokenizer fit together, and read their facts.

    Args:
        model_id: For error messages.
        model_config: transformers' ``SmolVLMConfig`` or mlx-vlm's (the same attributes).
        image_token_id: The model config's id of ``<image>``.
        image_processor: Either SmolVLM image processor (PIL or torchvision; mlx-vlm's is
            transformers'): its ``max_image_size`` and ``NORMALIZATION_SETTINGS`` count.
        declared_seq_len: See ``declared_image_seq_len``.
        tokenizer: The checkpoint's.
        eos: Where the checkpoint names EOS ids: each an id, a list of ids or None.

    Raises:
        ModelError: One line naming the model and what does not fit.
    """
    vision = model_config.vision_config
    image_seq_len = (vision.image_size // vision.patch_size) ** 2 // model_config.scale_factor**2
    max_size = getattr(image_processor, "max_image_size", None) or {}
    side = int(max_size.get("longest_edge", vision.image_size))
    if side != vision.image_size or declared_seq_len not in (None, image_seq_len):
        raise ModelError(
            f"{model_id} is inconsistent: frames of {side}px and {declared_seq_len} image tokens"
            f" in the processor config, {vision.image_size}px and {image_seq_len} in the model"
            " config"
        )
    encode = plain_encoder(tokenizer.encode)
    tokens = VideoTokens()
    for text in (tokens.bos, tokens.image, tokens.fake_around_image, tokens.global_image):
        if len(encode(text)) != 1:
            raise ModelError(f"{model_id}: the tokenizer lacks SmolVLM2's {text} token")
    if tokenizer.convert_tokens_to_ids(tokens.image) != image_token_id:
        raise ModelError(f"{model_id}: tokenizer and model disagree on the id of {tokens.image}")
    stops: set[object] = {tokenizer.convert_tokens_to_ids(tokens.end_of_utterance)}
    for source in eos:
        stops.update(source if isinstance(source, list) else [source])
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    settings = {name: getattr(image_processor, name, None) for name in NORMALIZATION_SETTINGS}
    return SmolVLMFacts(
        image_side=side,
        image_seq_len=image_seq_len,
        image_token_id=image_token_id,
        normalization=normalization_from(settings),
        digits=find_digit_tokens(encode),
        stop_ids=frozenset(i for i in stops if isinstance(i, int)),
        newline_ids=frozenset(i for i, text in enumerate(texts) if "\n" in text),
    )


def declared_image_seq_len(processor_file: str | Path | None) -> int | None:
    """``image_seq_len`` of a ``processor_config.json``; None if absent or unreadable."""
    if processor_file is None:
        return None
    try:
        value = json.loads(Path(processor_file).read_text(encoding="utf-8")).get("image_seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def normalization_from(settings: Mapping[str, Any]) -> Normalization:
    """``x * rescale_factor``, then ``(x - mean) / std``, from image processor settings.

    Args:
        settings: ``NORMALIZATION_SETTINGS``, as an image processor's attributes or JSON; a
            missing or None rescale factor is 1/255.
    """
    rescale = settings.get("rescale_factor") or 1 / 255
    if settings.get("do_rescale") is False:
        rescale = 1.0
    if settings.get("do_normalize") is False:
        return Normalization(float(rescale), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean = _rgb(settings.get("image_mean"))
    return Normalization(float(rescale), mean, _rgb(settings.get("image_std")))


def _rgb(value: object) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return float(value), float(value), float(value)
    if isinstance(value, Sequence) and len(value) == 3:  # noqa: PLR2004 - three channels
        red, green, blue = (float(channel) for channel in value)
        return red, green, blue
    raise ModelError(f"image processor mean/std must be one number or three, not {value!r}")


def plain_encoder(encode: Callable[..., Sequence[int]]) -> Callable[[str], list[int]]:
    """``tokenizer.encode`` as ``text -> ids``, special tokens as written (no BOS added)."""
    return lambda text: list(encode(text, add_special_tokens=False))


def find_digit_tokens(encode: Callable[[str], list[int]]) -> DigitTokens | None:
    """Check that every answer "1".."10" tokenizes as the prompt plus one token per digit.

    Args:
        encode: See ``plain_encoder``.

    Returns:
        None when no lead makes that true (a tokenizer that merges " 8" or "10"): the score
        must then come from free text.
    """
    tail = f"{VideoTokens().end_of_utterance}\nAssistant:{ANSWER_PREFIX}"
    description = encode(DESCRIPTION_PREFIX)
    for lead in (" ", ""):  # " 8" is how the requested format writes it: try that first
        base = encode(tail + lead)
        singles = [encode(tail + lead + digit) for digit in "0123456789"]
        if any(ids[:-1] != base or len(ids) != len(base) + 1 for ids in singles):
            continue
        digit_ids = tuple(ids[-1] for ids in singles)
        answers_ok = all(
            encode(tail + lead + str(score) + DESCRIPTION_PREFIX)
            == base + [digit_ids[int(c)] for c in str(score)] + description
            for score in range(1, 11)
        )
        if answers_ok:
            return DigitTokens(lead, digit_ids, tuple(description))
    return None


# --- windows in, answers out --------------------------------------------------------------------


def warm_up_request(width: int, height: int) -> ScoreRequest:
    """A throwaway 2-frame window: scored once, the first real one pays no one-off cost."""
    frames = tuple(
        Frame(WARM_UP_STREAM, i, float(i), 0.0, np.full((height, width, 3), 60 * i, np.uint8))
        for i in range(2)
    )
    return ScoreRequest(Window(WARM_UP_STREAM, 0, 0.0, 2.0, frames, 0.0), PROFILES["scene"])


def check_frames(window: Window, width: int, height: int) -> None:
    """Raise ``ValueError`` unless every frame is uint8 ``(height, width, 3)``."""
    for frame in window.frames:
        if frame.image.shape != (height, width, 3) or frame.image.dtype != np.uint8:
            raise ValueError(
                f"frame {frame.index} of {frame.stream!r} is {frame.image.dtype}"
                f" {frame.image.shape}; the model takes uint8 ({height}, {width}, 3)"
            )


def prompt_text(
    request: ScoreRequest,
    image_seq_len: int,
    digits: DigitTokens | None,
    tokens: VideoTokens = _VIDEO_TOKENS,
) -> str:
    """The exact text the model reads for ``request``, up to where the score is read."""
    window = request.window
    text = render_video_prompt(
        request.prompt,
        [frame.pts_s - window.start_s for frame in window.frames],
        window.duration_s,
        image_seq_len,
        tokens,
    )
    return text + (digits.lead if digits else "")


def best_frame_index(frames: Sequence[Frame]) -> int:
    """The frame right after the largest change (``motion.analyse``, one algorithm); 0 if one."""
    return motion.analyse(frames).peak_index
