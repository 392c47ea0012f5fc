from __future__ import annotations

import pytest

from streamd.domain import Prompt
from streamd.scoring.prompt import (
    ANSWER_PREFIX,
    PROFILES,
    format_hms,
    number_to_words,
    parse_answer,
    render_video_prompt,
    resolve_prompt,
)

GOLDEN = (
    "<|im_start|>System: Be brief.<end_of_utterance>\n"
    "User: You are provided the following series of two frames from a 0:00:08 [H:MM:SS] video.\n"
    "\nFrame from 00:00:<fake_token_around_image><global-img><image><image>"
    "<fake_token_around_image>"
    "\nFrame from 01:05:<fake_token_around_image><global-img><image><image>"
    "<fake_token_around_image>"
    "\n\nWhat happens?<end_of_utterance>\nAssistant: Significance:"
)


def test_video_prompt_golden() -> None:
    text = render_video_prompt(Prompt("Be brief.", "What happens?"), [0.4, 65.9], 8.0, 2)
    assert text == GOLDEN


def test_no_system_prompt_and_no_prefix() -> None:
    text = render_video_prompt(Prompt("", "Q?"), [0.0], 1.0, 1, answer_prefix="")
    assert text.startswith("<|im_start|>User: You are provided the following series of one frame")
    assert text.endswith("Q?<end_of_utterance>\nAssistant:")


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (8, "eight"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (64, "sixty-four"),
        (100, "one hundred"),
        (101, "one hundred and one"),
        (240, "two hundred and forty"),
        (1000, "one thousand"),
        (1001, "one thousand and one"),
        (2345, "two thousand, three hundred and forty-five"),
    ],
)
def test_number_to_words_matches_num2words(n: int, words: str) -> None:
    assert number_to_words(n) == words


def test_hms() -> None:
    assert format_hms(8.9) == "0:00:08"
    assert format_hms(3725) == "1:02:05"


def test_profiles_ask_for_a_score() -> None:
    assert set(PROFILES) == {"highlights", "sports", "surveillance", "scene", "technical"}
    for prompt in PROFILES.values():
        assert "1" in prompt.question
        assert "10" in prompt.question
        assert "Significance:" in prompt.question
    assert "dramatic action" in PROFILES["highlights"].system
    assert "goals" in PROFILES["sports"].system
    assert "vehicles" in PROFILES["surveillance"].system
    assert "camera movements" in PROFILES["technical"].system


def test_overrides() -> None:
    assert resolve_prompt("sports", system="S").system == "S"
    assert resolve_prompt("sports", question="Q").question == "Q"
    assert resolve_prompt("sports") == PROFILES["sports"]
    assert ANSWER_PREFIX.strip() == "Significance:"


@pytest.mark.parametrize(
    ("text", "after_prefix", "significance", "description"),
    [
        ('{"significance": 8, "description": "A goal."}', False, 8, "A goal."),
        ('Sure! {"score": "7", "event": "Foul"}', False, 7, "Foul"),
        ("8/10 - a red card is shown", False, 8, "a red card is shown"),
        ("I rate it 9 out of 10.", False, 9, "I rate it ."),
        (
            "Significance: 8\nDescription: A person climbs the fence.",
            False,
            8,
            "A person climbs the fence.",
        ),
        ("significance of 3. Nothing happens.", False, 3, "Nothing happens."),
        (" 7\nDescription: Cars pass.", True, 7, "Cars pass."),
        (" 10. Description: Goal!", True, 10, "Goal!"),
        ("A man walks a dog.", False, None, "A man walks a dog."),
        ("Significance: 11", False, None, ""),
        ("Significance: 0", False, None, ""),
        ('{"significance": 42}', False, None, ""),
        ('{"significance": true}', False, None, ""),
        ("The year 2024 was great", False, None, "The year 2024 was great"),
        ("", True, None, ""),
    ],
)
def test_parse_answer(
    text: str, after_prefix: bool, significance: int | None, description: str
) -> None:
    parsed = parse_answer(text, after_prefix=after_prefix)
    assert parsed.significance == significance
    assert parsed.description == description


def test_parse_never_defaults() -> None:
    for junk in ("", "lorem ipsum", "important dramatic key moment", "5 people"):
        assert parse_answer(junk).significance is None
