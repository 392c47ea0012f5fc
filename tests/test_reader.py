"""The answer reader both in-process SmolVLM2 backends call in the same order (pure)."""

from __future__ import annotations

import pytest

from streamd.scoring.prompt import DESCRIPTION_PREFIX
from streamd.scoring.smolvlm.checkpoint import FREE_TEXT_EXTRA_TOKENS, DigitTokens
from streamd.scoring.smolvlm.reader import AnswerReader

DIGITS = DigitTokens(" ", tuple(range(10, 20)), (90, 91))
STOP, NEWLINE = 1, 2
READER = AnswerReader(DIGITS, frozenset({STOP}), frozenset({NEWLINE}), 0.5, 4)


def probabilities(**by_digit: float) -> list[float]:
    p = [0.0] * 10
    for digit, value in by_digit.items():
        p[int(digit.removeprefix("d"))] = value
    return p


def test_the_best_digit_is_the_score_and_the_description_follows() -> None:
    p = probabilities(d7=0.6, d3=0.3)
    answer = READER.start(p)
    assert answer.significance == 7
    assert not READER.wants_one_or_ten(answer, p)
    READER.finish(answer, one_fed=False, describe_below=None)
    assert answer.feed == [17, 90, 91]  # "7", then the description prefix
    assert answer.generate
    tokens: list[int] = []
    limit = READER.limit(answer)
    assert limit == 4
    assert READER.take(answer, tokens, 50, limit)
    assert not READER.take(answer, tokens, NEWLINE, limit)  # a description is one line
    assert READER.read(answer, "A car parks.\nmore") == (
        7,
        "A car parks.",
        f" 7{DESCRIPTION_PREFIX}A car parks.",
    )


@pytest.mark.parametrize(("p_zero", "expected", "kept"), [(0.9, 10, True), (0.1, 1, True)])
def test_one_step_more_tells_ten_from_one(p_zero: float, expected: int, kept: bool) -> None:
    p = probabilities(d1=0.7, d5=0.2)
    answer = READER.start(p)
    assert READER.wants_one_or_ten(answer, p)
    assert READER.settle(answer, p, p_zero) is kept
    assert answer.significance == expected
    READER.finish(answer, one_fed=kept, describe_below=None)
    assert answer.feed[: len(str(expected)) - 1] == [DIGITS.digit_ids[0]] * (expected == 10)


def test_the_other_digit_can_still_win_after_one() -> None:
    p = probabilities(d1=0.4, d5=0.35)
    answer = READER.start(p)
    assert READER.wants_one_or_ten(answer, p)
    # P(10) = 0.4 * 0.5 and P(1) = 0.4 * 0.5 both lose to P(5) = 0.35: the "1" is not kept.
    assert READER.settle(answer, p, 0.5) is False
    assert answer.significance == 5


def test_quiet_windows_skip_the_description() -> None:
    answer = READER.start(probabilities(d3=0.9))
    READER.finish(answer, one_fed=False, describe_below=6)
    assert answer.feed == [13]
    assert not answer.generate
    assert READER.read(answer, "") == (3, "", " 3")


def test_little_digit_mass_means_free_text_parsed_later() -> None:
    answer = READER.start(probabilities(d0=0.9, d4=0.05))
    assert answer.free_text
    assert READER.limit(answer) == 4 + FREE_TEXT_EXTRA_TOKENS
    tokens: list[int] = []
    assert READER.take(answer, tokens, NEWLINE, 100)  # free text goes past newlines
    assert not READER.take(answer, tokens, STOP, 100)
    significance, description, _ = READER.read(answer, "8\nDescription: A fence is climbed.")
    assert significance == 8
    assert description == "A fence is climbed."
    unreadable = READER.start(None)
    assert READER.read(unreadable, "no number here")[0] is None
