"""Reading an answer: the score from the digit probabilities, then the generated description.

Shared by the transformers and mlx backends, so neither torch nor mlx: each backend computes
the probabilities and runs the decode, these functions decide what the answer is and needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from streamd.scoring.prompt import DESCRIPTION_PREFIX, clean_description, parse_answer
from streamd.scoring.smolvlm.checkpoint import FREE_TEXT_EXTRA_TOKENS, DigitTokens, SmolVLMFacts


@dataclass(slots=True)
class Answer:
    """What is known of one answer, and what it still needs."""

    text: str
    """The answer after the prefix so far (lead, digits, description prefix)."""
    significance: int | None = None
    feed: list[int] = field(default_factory=list)
    """Tokens to append before generating."""
    generate: bool = False
    free_text: bool = False


def free_text_answer(digits: DigitTokens | None) -> Answer:
    """An answer left to generate in full, then parse."""
    return Answer(digits.lead if digits else "", generate=True, free_text=True)


def first_digit(digits: DigitTokens, p: Sequence[float], min_digit_mass: float) -> Answer:
    """The answer from ``p``, the probabilities of "0".."9" after the prefix.

    Free text below ``min_digit_mass`` on "1".."9"; else the best of 2..9, which
    ``wants_one_or_ten`` and ``one_or_ten`` may still replace with 1 or 10.
    """
    if sum(p[1:]) < min_digit_mass:
        return free_text_answer(digits)
    return Answer(digits.lead, max(range(2, 10), key=p.__getitem__))


def wants_one_or_ten(answer: Answer, p: Sequence[float]) -> bool:
    """Whether "1" beats the answer's digit: then one step more tells 1 from 10."""
    return answer.significance is not None and p[1] > p[answer.significance]


def one_or_ten(p: Sequence[float], p_zero: float, other: int) -> int:
    """1, 10 or ``other``, with ``p_zero`` the probability of "0" after "1".

    "10" is "1" then "0", and both may still lose to ``other`` (P(1) = P(10) + P(1, not 0)).
    """
    candidates = {10: p[1] * p_zero, 1: p[1] * (1 - p_zero), other: p[other]}
    return max(candidates, key=candidates.__getitem__)


def finish_answer(
    answer: Answer, digits: DigitTokens, one_fed: bool, describe_below: int | None
) -> None:
    """Add the digits still to feed and, unless below ``describe_below``, the description.

    Args:
        answer: Its ``significance`` is set.
        digits: The tokenizer's digits.
        one_fed: The "1" of "10" (or of 1) is already in the cache.
        describe_below: ``ScoreRequest.describe_below``.
    """
    significance = answer.significance
    if significance is None:
        return
    text = str(significance)
    answer.feed = [digits.digit_ids[int(c)] for c in (text[1:] if one_fed else text)]
    answer.text += text
    if describe_below is None or significance >= describe_below:
        answer.feed += digits.description_ids
        answer.text += DESCRIPTION_PREFIX
        answer.generate = True


def token_limit(answer: Answer, max_new_tokens: int) -> int:
    """How many tokens ``answer`` may generate."""
    return max_new_tokens + (FREE_TEXT_EXTRA_TOKENS if answer.free_text else 0)


def take_token(
    answer: Answer,
    tokens: list[int],
    token: int,
    limit: int,
    stops: frozenset[int],
    newlines: frozenset[int],
) -> bool:
    """Append a generated ``token`` to ``tokens`` unless it stops; whether to go on.

    Args:
        answer: What is being generated (a description is one line; free text is not).
        tokens: Generated so far.
        token: The next one.
        limit: See ``token_limit``.
        stops: The checkpoint's stop ids.
        newlines: The checkpoint's newline ids.
    """
    if token in stops:
        return False
    tokens.append(token)
    at_newline = not answer.free_text and token in newlines
    return not (at_newline or len(tokens) >= limit)


def generated_text(answer: Answer, text: str) -> str:
    """The decoded tokens as the answer keeps them: a description stops at its first line."""
    return text if answer.free_text else text.split("\n", 1)[0]


def read_answer(answer: Answer, text: str) -> tuple[int | None, str, str]:
    """``(significance, description, raw)`` of ``answer`` once ``text`` is generated."""
    raw = answer.text + text
    if answer.free_text:
        parsed = parse_answer(raw, after_prefix=True)
        return parsed.significance, parsed.description, raw
    return answer.significance, clean_description(text), raw


@dataclass(frozen=True, slots=True)
class AnswerReader:
    """How one checkpoint's answers are read: the steps above, bound to its tokens and limits.

    Both in-process backends hold one and call it in the same order: ``start`` (the first
    digit, from the probabilities of "0".."9" after the prefix, or free text), then, when
    ``wants_one_or_ten``, ``settle`` with the probability of "0" after "1", then ``finish``,
    then ``take`` each generated token up to ``limit``, and ``read`` the result. Computing the
    probabilities and running the decode is each backend's own (torch or mlx).
    """

    digits: DigitTokens | None
    stop_ids: frozenset[int]
    newline_ids: frozenset[int]
    min_digit_mass: float
    max_new_tokens: int

    @classmethod
    def of(cls, facts: SmolVLMFacts, min_digit_mass: float, max_new_tokens: int) -> AnswerReader:
        """The reader of a loaded checkpoint."""
        return cls(facts.digits, facts.stop_ids, facts.newline_ids, min_digit_mass, max_new_tokens)

    def start(self, p: Sequence[float] | None) -> Answer:
        """The answer from the digit probabilities ``p`` (None, or no digits: free text)."""
        if self.digits is None or p is None:
            return free_text_answer(self.digits)
        return first_digit(self.digits, p, self.min_digit_mass)

    def wants_one_or_ten(self, answer: Answer, p: Sequence[float]) -> bool:
        """See the function of that name."""
        return wants_one_or_ten(answer, p)

    def settle(self, answer: Answer, p: Sequence[float], p_zero: float) -> bool:
        """1, 10 or the answer's digit, with "1" fed; whether that "1" stays in the cache."""
        answer.significance = one_or_ten(p, p_zero, answer.significance or 2)
        return answer.significance in (1, 10)

    def finish(self, answer: Answer, one_fed: bool, describe_below: int | None) -> None:
        """See ``finish_answer``."""
        if self.digits is not None:
            finish_answer(answer, self.digits, one_fed, describe_below)

    def limit(self, answer: Answer) -> int:
        """How many tokens ``answer`` may generate."""
        return token_limit(answer, self.max_new_tokens)

    def take(self, answer: Answer, tokens: list[int], token: int, limit: int) -> bool:
        """Append ``token`` unless it stops the answer; whether to go on."""
        return take_token(answer, tokens, token, limit, self.stop_ids, self.newline_ids)

    def read(self, answer: Answer, decoded: str) -> tuple[int | None, str, str]:
        """``(significance, description, raw)`` once the generated tokens are ``decoded``."""
        return read_answer(answer, generated_text(answer, decoded))
