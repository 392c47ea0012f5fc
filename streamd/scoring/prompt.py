"""Prompt profiles, SmolVLM2's video prompt, and parsing of free-text answers (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from streamd.domain import Prompt
from streamd.timefmt import format_clock

ANSWER_PREFIX = " Significance:"
"""Text the assistant turn is started with; the score is read right after it."""
DESCRIPTION_PREFIX = "\nDescription:"
"""Text placed after the score; the description is generated right after it."""

_FORMAT = (
    " Rate how significant this segment is on a scale from 1 (nothing notable happens) to 10"
    " (a major event), then describe the main event in one short sentence."
    " Answer exactly as:\nSignificance: <1-10>\nDescription: <one sentence>"
)

PROFILES: dict[str, Prompt] = {
    "highlights": Prompt(
        system=(
            "Focus only on describing the key dramatic action or notable event occurring in this"
            " video segment. Skip general context or scene-setting details unless they are crucial"
            " to understanding the main action."
        ),
        question="What is the key dramatic action or notable event in this segment?" + _FORMAT,
    ),
    "sports": Prompt(
        system=(
            "You are watching a sports broadcast. Focus on goals, significant plays, fouls, cards,"
            " substitutions and crowd reactions. Routine play, replays of nothing and commentary"
            " shots are not significant."
        ),
        question="What is the most important play or moment in this segment?" + _FORMAT,
    ),
    "surveillance": Prompt(
        system=(
            "You are watching a security camera. Focus on people, vehicles, entries and exits,"
            " and any unusual activity. Lighting changes, weather, moving foliage and an empty"
            " scene are not significant."
        ),
        question="What activity, if any, happens in this segment?" + _FORMAT,
    ),
    "scene": Prompt(
        system="Give a concise summary of the main events in this video segment.",
        question="What are the main events in this segment?" + _FORMAT,
    ),
    "technical": Prompt(
        system=(
            "Focus on the technical side of this video segment: camera movements, cuts and"
            " transitions, lighting, and visual effects."
        ),
        question="What camera, lighting or editing technique stands out in this segment?" + _FORMAT,
    ),
}


def resolve_prompt(profile: str, system: str | None = None, question: str | None = None) -> Prompt:
    """The profile's prompt with the per-stream or per-call overrides applied."""
    base = PROFILES[profile]
    return Prompt(
        system=base.system if system is None else system,
        question=base.question if question is None else question,
    )


# --- SmolVLM2's video prompt ------------------------------------------------------------------

_ONES = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen"),
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_TEEN_END, _HUNDRED, _THOUSAND, _MILLION = 20, 100, 1000, 1_000_000
MIN_SIGNIFICANCE, MAX_SIGNIFICANCE = 1, 10


def number_to_words(n: int) -> str:
    """English words for ``0 <= n < 1_000_000`` as ``num2words`` writes them (what SmolVLM uses)."""
    if n < 0 or n >= _MILLION:
        raise ValueError(f"{n} out of range")
    if n < _TEEN_END:
        return _ONES[n]
    if n < _HUNDRED:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < _THOUSAND:
        hundreds, rest = divmod(n, _HUNDRED)
        head = f"{_ONES[hundreds]} hundred"
        return head + (f" and {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, _THOUSAND)
    head = f"{number_to_words(thousands)} thousand"
    if not rest:
        return head
    return head + (" and " if rest < _HUNDRED else ", ") + number_to_words(rest)


def format_hms(seconds: float) -> str:
    """``H:MM:SS`` of whole seconds, as ``str(timedelta)`` prints it."""
    return format_clock(seconds, with_hours=True)


@dataclass(frozen=True, slots=True)
class VideoTokens:
    """The special tokens of a SmolVLM checkpoint's tokenizer."""

    image: str = "<image>"
    fake_around_image: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"
    end_of_utterance: str = "<end_of_utterance>"
    bos: str = "<|im_start|>"


def render_video_prompt(
    prompt: Prompt,
    frame_times_s: Sequence[float],
    duration_s: float,
    image_seq_len: int,
    tokens: VideoTokens = VideoTokens(),
    answer_prefix: str = ANSWER_PREFIX,
) -> str:
    """The exact text SmolVLM2's processor builds for a video, plus our answer prefix.

    Args:
        prompt: System prompt (may be empty) and question.
        frame_times_s: Each frame's time from the start of the clip, seconds.
        duration_s: The clip's length (the window's span).
        image_seq_len: Image tokens per frame (64 for SmolVLM2-256M).
        tokens: The checkpoint's special tokens.
        answer_prefix: Appended after ``Assistant:``; "" for the bare chat template.
    """
    image = (
        f"{tokens.fake_around_image}{tokens.global_image}"
        f"{tokens.image * image_seq_len}{tokens.fake_around_image}"
    )
    parts = [tokens.bos]
    if prompt.system:
        parts.append(f"System: {prompt.system}{tokens.end_of_utterance}\n")
    parts.append(
        f"User: You are provided the following series of {number_to_words(len(frame_times_s))}"
        f" frames from a {format_hms(duration_s)} [H:MM:SS] video.\n"
    )
    for t in frame_times_s:
        minutes, secs = int(t // 60), int(t % 60)
        parts.append(f"\nFrame from {minutes:02d}:{secs:02d}:{image}")
    parts.append(f"\n\n{prompt.question}{tokens.end_of_utterance}\nAssistant:{answer_prefix}")
    return "".join(parts)


# --- Free-text answers --------------------------------------------------------------------------

_JSON_RE = re.compile(r"\{[^{}]*\}")
_SCORE_PATTERNS = (
    re.compile(r"\b(?:significance|score|rating)\b\s*(?:is|of|=|:)?\s*(\d{1,2})(?!\d)", re.I),
    re.compile(r"(?<![\d.])(\d{1,2})\s*(?:/|out of)\s*10\b", re.I),
)
_LEADING_RE = re.compile(r"^\s*[:=]?\s*(\d{1,2})(?![\d/])")
_DESCRIPTION_RE = re.compile(r"\bdescription\b\s*[:=]\s*(.+)", re.I | re.S)


@dataclass(frozen=True, slots=True)
class ParsedAnswer:
    """What ``parse_answer`` read from free text."""

    significance: int | None
    description: str


def parse_answer(text: str, after_prefix: bool = False) -> ParsedAnswer:
    """Read a 1-10 significance and a description from a model's free-text answer.

    Accepts JSON (``{"significance": 8, "description": ...}``), ``8/10``, ``8 out of 10``,
    ``Significance: 8`` and, when ``after_prefix`` (the answer continues our ``Significance:``
    prefix), a bare leading number. Anything else, or a number outside 1-10, gives
    ``significance=None``; never a made-up default.
    """
    from_json = _parse_json(text)
    if from_json is not None:
        return from_json
    significance: int | None = None
    match = _LEADING_RE.match(text) if after_prefix else None
    if match is None:
        for pattern in _SCORE_PATTERNS:
            match = pattern.search(text)
            if match:
                break
    if match is not None:
        value = int(match.group(1))
        significance = value if MIN_SIGNIFICANCE <= value <= MAX_SIGNIFICANCE else None
    return ParsedAnswer(significance, _description(text, match))


def _parse_json(text: str) -> ParsedAnswer | None:
    for candidate in _JSON_RE.findall(text):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        raw = next((data[k] for k in ("significance", "score", "rating") if k in data), None)
        if raw is None:
            continue
        value = _as_int(raw)
        description = str(data.get("description", data.get("event", ""))).strip()
        valid = value is not None and MIN_SIGNIFICANCE <= value <= MAX_SIGNIFICANCE
        return ParsedAnswer(value if valid else None, description)
    return None


def _as_int(raw: object) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    return None


def _description(text: str, score_match: re.Match[str] | None) -> str:
    found = _DESCRIPTION_RE.search(text)
    if found:
        return clean_description(found.group(1))
    if score_match is not None:
        text = text[: score_match.start()] + text[score_match.end() :]
    return clean_description(text)


def clean_description(text: str) -> str:
    """First line, trimmed of stray punctuation and whitespace."""
    text = text.strip().lstrip(".:;,- \u2013").strip()
    first = text.splitlines()[0] if text else ""
    return first.strip()
