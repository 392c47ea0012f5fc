"""OpenAI chat-completions bodies for windows, and reading the answers back (pure, no I/O).

What a server returns is untrusted JSON: every reader here takes ``object`` and checks each
step, so a server that leaves a field out gives "unreadable", never an exception.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import JsonValue

from streamd.domain import Image as Picture
from streamd.domain import Prompt
from streamd.scoring.prompt import (
    ANSWER_PREFIX,
    DESCRIPTION_PREFIX,
    MAX_SIGNIFICANCE,
    MIN_SIGNIFICANCE,
    format_hms,
    number_to_words,
    parse_answer,
)
from streamd.scoring.smolvlm.checkpoint import DEFAULT_MIN_DIGIT_MASS
from streamd.scoring.smolvlm.reader import one_or_ten

JPEG_QUALITY = 90
TOP_LOGPROBS = 20
"""The most alternatives the OpenAI API allows per position."""
IMAGE_TOKENS_PER_FRAME = 64
"""SmolVLM2-256M/500M: one 512-px tile is 64 tokens (the 2.2B: 81 per 384-px tile)."""
LABEL_TOKENS_PER_FRAME = 16
"""``Frame from MM:SS:`` and the image's wrapper tokens, generously."""
TEXT_CHARS_PER_TOKEN = 3
"""English BPE averages about 4 characters a token: 3 keeps the estimate generous."""
TILING_FACTOR = 2.0
"""A prompt this many times its estimate means the server tiles frames: a tiled 512-px frame is
17 tiles, a 1080p one 13+, where one tile was meant."""
MESSAGE_CHARS = 200
"""A server's error message is quoted up to this length."""
SCORE_MAX_TOKENS = 8
"""Tokens that reach the score of ``Significance: 10`` (about 6 with SmolVLM2's tokenizer)."""
PREFIXED_SCORE_MAX_TOKENS = 3
"""Tokens that reach the score when the answer is continued from ``Significance:``."""
SCORE_PREFIX = ANSWER_PREFIX.lstrip()
"""The assistant message the score is continued from, as the local backends start it."""

Body = dict[str, JsonValue]


# --- request ------------------------------------------------------------------------------------


def encode_jpeg(image: Picture, quality: int = JPEG_QUALITY) -> str:
    """``image`` as a ``data:image/jpeg;base64,...`` URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def frame_label(offset_s: float) -> str:
    """The text SmolVLM2's video prompt puts before a frame: a newline, ``Frame from MM:SS:``."""
    minutes, secs = int(offset_s // 60), int(offset_s % 60)
    return f"\nFrame from {minutes:02d}:{secs:02d}:"


def video_intro(frames: int, duration_s: float) -> str:
    """The line SmolVLM2's video prompt opens the user turn with."""
    return (
        f"You are provided the following series of {number_to_words(frames)}"
        f" frames from a {format_hms(duration_s)} [H:MM:SS] video.\n"
    )


def user_content(
    prompt: Prompt, offsets_s: Sequence[float], duration_s: float, image_urls: Sequence[str]
) -> list[JsonValue]:
    """The user turn: intro, each frame's label then its image, in time order, the question.

    Rendered by a SmolVLM chat template (which joins the parts as they are), this is the text of
    ``render_video_prompt`` with each frame's image tokens where the processor expands them.
    """
    parts: list[JsonValue] = [{"type": "text", "text": video_intro(len(image_urls), duration_s)}]
    for offset_s, url in zip(offsets_s, image_urls, strict=True):
        parts.append({"type": "text", "text": frame_label(offset_s)})
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": f"\n\n{prompt.question}"})
    return parts


def chat_body(
    model_id: str,
    prompt: Prompt,
    content: list[JsonValue],
    max_tokens: int,
    extra_body: Mapping[str, JsonValue],
    assistant_prefix: str | None = None,
) -> Body:
    """One chat-completions request: greedy, with the top log-probabilities of every token.

    With ``assistant_prefix`` the answer continues that started assistant message (vLLM's and
    SGLang's ``continue_final_message``; llama.cpp continues a final assistant message anyway).
    ``extra_body`` goes in last and verbatim: a server-specific knob may override anything.
    """
    messages: list[JsonValue] = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": content})
    continued: Body = {}
    if assistant_prefix is not None:
        messages.append({"role": "assistant", "content": assistant_prefix})
        continued = {"continue_final_message": True, "add_generation_prompt": False}
    body: Body = {
        "model": model_id,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
        **continued,
    }
    body.update(extra_body)
    return body


def description_prefix(significance: int) -> str:
    """The assistant message a description continues: the score as the local backends write it."""
    return f"{SCORE_PREFIX} {significance}{DESCRIPTION_PREFIX}"


def prompt_chars(prompt: Prompt, content: Sequence[JsonValue]) -> int:
    """Characters of text in a request (system prompt and user turn)."""
    texts = [part.get("text") for part in content if isinstance(part, dict)]
    return len(prompt.system) + sum(len(text) for text in texts if isinstance(text, str))


def expected_prompt_tokens(frames: int, text_chars: int) -> int:
    """A generous estimate of a window's prompt tokens when every frame is one 512 tile."""
    text_tokens = -(-text_chars // TEXT_CHARS_PER_TOKEN)
    return frames * (IMAGE_TOKENS_PER_FRAME + LABEL_TOKENS_PER_FRAME) + text_tokens


def looks_tiled(prompt_tokens: int | None, frames: int, text_chars: int) -> bool:
    """Whether the server counted far more prompt tokens than one tile a frame explains."""
    if prompt_tokens is None or frames == 0:
        return False
    return prompt_tokens > TILING_FACTOR * expected_prompt_tokens(frames, text_chars)


# --- answer -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """What one chat completion said about a window.

    Attributes:
        text: The answer text ("" when the server sent none).
        significance: 1-10 from the digit probabilities, else from the text, else None.
        description: The answer's one-sentence description.
        from_logprobs: The significance was read from the digit probabilities.
        prompt_tokens: ``usage.prompt_tokens``, if the server reported it.
        completion_tokens: ``usage.completion_tokens``, if reported.
    """

    text: str
    significance: int | None
    description: str
    from_logprobs: bool
    prompt_tokens: int | None
    completion_tokens: int | None


def read_completion(
    body: object, min_digit_mass: float = DEFAULT_MIN_DIGIT_MASS, after_prefix: bool = False
) -> Completion:
    """Read a chat-completions response body (``response.json()``).

    ``after_prefix``: the answer continues ``Significance:``, so a bare leading number is the
    score.
    """
    choice = _first(_get(body, "choices"))
    content = _get(_get(choice, "message"), "content")
    text = content if isinstance(content, str) else ""
    parsed = parse_answer(text, after_prefix=after_prefix)
    from_logprobs = logprob_significance(_get(_get(choice, "logprobs"), "content"), min_digit_mass)
    usage = _get(body, "usage")
    return Completion(
        text=text,
        significance=parsed.significance if from_logprobs is None else from_logprobs,
        description=parsed.description,
        from_logprobs=from_logprobs is not None,
        prompt_tokens=_int(_get(usage, "prompt_tokens")),
        completion_tokens=_int(_get(usage, "completion_tokens")),
    )


def logprob_significance(positions: object, min_digit_mass: float) -> int | None:
    """The score from the top log-probabilities at the answer's first number, or None.

    The number is the first generated digit that starts the answer or follows a ``:`` or ``=``
    (``Significance: 8``, ``{"significance": 8}``), so a "Frame 2" in prose is not read as one.
    As in the local backends: None below ``min_digit_mass`` on "1".."9" (then the text is
    parsed); else the likeliest of 2-9, unless "1" beats it: then "10" is "1" followed by "0",
    P(10) = P("1")·P("0" | "1") with the next position's probabilities when "1" was generated.
    """
    if not isinstance(positions, list):
        return None
    before = ""
    for i, position in enumerate(positions):
        token = _get(position, "token")
        if not isinstance(token, str):
            return None
        stripped = token.strip()
        if stripped[:1].isdigit():
            if before.strip() and not before.rstrip().endswith((":", "=")):
                return None
            return _score_at(positions, i, stripped, min_digit_mass)
        before += token
    return None


def _score_at(positions: list[object], i: int, token: str, min_digit_mass: float) -> int | None:
    p = digit_probabilities(_get(positions[i], "top_logprobs"))
    mass = 0.0 if p is None else sum(p[1:])
    if p is None or mass <= 0 or mass < min_digit_mass:
        return None  # no digit 1-9 among the alternatives: nothing to read, never a default
    other = max(range(2, 10), key=p.__getitem__)
    if p[1] <= p[other]:
        return other
    p_zero = 0.0
    if token == "1" and i + 1 < len(positions):  # noqa: S105 - a token, not a password
        after = digit_probabilities(_get(positions[i + 1], "top_logprobs"))
        p_zero = 0.0 if after is None else after[0]
    elif token == "10":  # noqa: S105 - a tokenizer that keeps "10" whole generated it
        p_zero = 1.0
    value = one_or_ten(p, p_zero, other)
    return value if MIN_SIGNIFICANCE <= value <= MAX_SIGNIFICANCE else None


def digit_probabilities(top: object) -> list[float] | None:
    """P("0").."P("9") at one position from its ``top_logprobs`` (0 for digits not listed)."""
    if not isinstance(top, list) or not top:
        return None
    p = [0.0] * 10
    for entry in top:
        token, logprob = _get(entry, "token"), _get(entry, "logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float):
            continue
        digit = token.strip()
        if len(digit) == 1 and digit.isdigit() and digit.isascii():
            p[int(digit)] += math.exp(logprob)
    return p


# --- other answers ------------------------------------------------------------------------------


def served_model_ids(body: object) -> list[str]:
    """The ids a ``GET /models`` body lists."""
    data = _get(body, "data")
    if not isinstance(data, list):
        return []
    return [i for i in (_get(entry, "id") for entry in data) if isinstance(i, str)]


def error_message(body: object, fallback: str) -> str:
    """The one-line message of an error body (OpenAI/vLLM, llama.cpp, FastAPI shapes)."""
    error = _get(body, "error")
    candidates = (
        _get(error, "message"),
        error,
        _get(body, "message"),
        _get(body, "detail"),
        _get(_first(_get(body, "detail")), "msg"),
    )
    text = next((c for c in candidates if isinstance(c, str) and c.strip()), fallback)
    line = (text.strip().splitlines() or [fallback])[0]
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def retry_after_s(header: str | None, attempt: int, cap_s: float) -> float:
    """How long to wait before retry ``attempt`` (0-based), at most ``cap_s``.

    ``Retry-After`` seconds when the server sent them, else exponential from 0.5 s.
    """
    if header is not None:
        try:
            value = float(header.strip())
        except ValueError:
            value = math.nan  # an HTTP date: rare from inference servers, use the backoff
        if math.isfinite(value) and value >= 0:
            return min(value, cap_s)
    return min(0.5 * 2.0**attempt, cap_s)


def _get(value: object, key: str) -> object:
    return value.get(key) if isinstance(value, dict) else None


def _first(value: object) -> object:
    return value[0] if isinstance(value, list) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
