"""The transformers backend's decode path: exact text-prefix cache, reserved KV, greedy loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from streamd.domain import Prompt, Score, ScoreRequest, Window
from streamd.scoring.prompt import DESCRIPTION_PREFIX, PROFILES
from streamd.scoring.transformers_decode import MIN_PREFIX_TOKENS, RowPlan, TextDecoder
from streamd.scoring.transformers_impl import TransformersBackend
from streamd.scoring.transformers_kv import PrefixCache, ReservedLayer
from tests.test_transformers_backend import (
    digit,
    make_backend,
    reference_generate,
    request,
    steer,
)
from tests.tiny_smolvlm import tiny_model_dir

__all__ = ["tiny_model_dir"]  # the session fixture, until conftest imports it

OTHER = Prompt(system="You are watching a garden.", question=PROFILES["surveillance"].question)


@pytest.fixture
def cached(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    """The default: text prefixes cached."""
    backend = make_backend(tiny_model_dir, min_digit_mass=0.0)
    yield backend
    backend.close()


@pytest.fixture
def uncached(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    backend = make_backend(tiny_model_dir, min_digit_mass=0.0, prefix_entries=0)
    yield backend
    backend.close()


class PrefillCounter:
    """Tokens that go through the text model per forward (prefill, then each step)."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.tokens: list[int] = []
        text_model = backend.checkpoint.model.model.text_model
        self._handle = text_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: object, args: object, kwargs: dict[str, torch.Tensor]) -> None:
        inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = kwargs["input_ids"]
        self.tokens.append(int(inputs.shape[1]))

    def close(self) -> None:
        self._handle.remove()


def answers(scores: list[Score]) -> list[tuple[int | None, str, str]]:
    return [(s.significance, s.raw, s.description) for s in scores]


def prefix_length(backend: TransformersBackend, req: ScoreRequest) -> int:
    checkpoint = backend.checkpoint
    return checkpoint.encode(backend.prompt_text(req)).index(checkpoint.image_token_id)


# --- exact text-prefix cache ----------------------------------------------------------------------


def test_prefix_cache_changes_no_answer(
    cached: TransformersBackend, uncached: TransformersBackend
) -> None:
    windows = [request("a", first, 4) for first in (0, 2, 4, 6)]
    for req in windows:
        with steer(cached, []) as fast, steer(uncached, []) as full:
            assert answers(cached.score([req])) == answers(uncached.score([req]))
        # Same token ids at the same positions; the prefix's keys and values were computed
        # in another call, so equal up to float rounding (a wrong token moves them by ~1e-2).
        for step_fast, step_full in zip(fast, full, strict=True):
            torch.testing.assert_close(step_fast, step_full, rtol=0, atol=1e-5)
    assert cached.prefix_cache is not None
    assert (cached.prefix_cache.misses, cached.prefix_cache.hits) == (1, 3)
    assert len(cached.prefix_cache) == 1


def test_a_cached_prefix_still_decodes_as_generate(cached: TransformersBackend) -> None:
    cached.score([request("a", 0, 3, below=11)])  # leaves the stream's prefix
    req = request("a", 1, 3)
    score = cached.score([req])[0]
    assert cached.prefix_cache is not None
    assert cached.prefix_cache.hits == 1
    assert score.significance is not None
    expected = reference_generate(cached, req, str(score.significance))
    assert expected
    assert score.raw == f" {score.significance}{DESCRIPTION_PREFIX}{expected}"


def test_the_prefix_is_prefilled_once_per_stream(cached: TransformersBackend) -> None:
    first, second = request("a", 0, 3, below=11), request("a", 2, 3, below=11)
    full = len(cached.checkpoint.encode(cached.prompt_text(second)))
    prefix = prefix_length(cached, second)
    assert prefix >= MIN_PREFIX_TOKENS
    counter = PrefillCounter(cached)
    cached.score([first])
    cached.score([second])
    counter.close()
    prefills = [n for n in counter.tokens if n > 2]  # not the "1" -> "0"? step
    assert prefills == [full, full - prefix]


def test_prefixes_are_kept_per_prompt_and_shared_when_identical(
    cached: TransformersBackend, uncached: TransformersBackend
) -> None:
    assert cached.prefix_cache is not None
    cached.score([request("a", 0, 2, below=11), request("b", 0, 2, prompt=OTHER, below=11)])
    assert (len(cached.prefix_cache), cached.prefix_cache.hits) == (2, 0)
    # A new stream whose prompt renders the same ids shares a's entry (exact ids, exact KV).
    # One batch mixing hits (a, b, c), a miss (d) and different prefix lengths.
    batch = [
        request("a", 2, 2),
        request("b", 2, 2, prompt=OTHER),
        request("c", 0, 2),
        request("d", 0, 2, prompt=Prompt(system="", question="Anything?")),
    ]
    scores = cached.score(batch)
    assert (len(cached.prefix_cache), cached.prefix_cache.hits) == (3, 3)
    assert answers(scores) == answers([uncached.score([req])[0] for req in batch])


def test_prefix_cache_is_bounded_lru() -> None:
    cache = PrefixCache(capacity=2)
    kv = torch.zeros(1)
    cache.put((1,), kv)
    cache.put((2,), kv)
    assert cache.get((1,)) is kv  # now the most recently used
    cache.put((3,), kv)
    assert (2,) not in cache
    assert (1,) in cache
    assert len(cache) == 2
    assert cache.get((2,)) is None
    assert (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(capacity=0)


def test_backend_keeps_at_most_prefix_entries(tiny_model_dir: Path) -> None:
    backend = make_backend(tiny_model_dir, min_digit_mass=0.0, prefix_entries=2)
    for n, system in enumerate(("One.", "Two.", "Three.")):
        prompt = Prompt(system=f"{system} {OTHER.system}", question=OTHER.question)
        backend.score([request(f"s{n}", 0, 2, prompt=prompt, below=11)])
    assert backend.prefix_cache is not None
    assert len(backend.prefix_cache) == 2
    backend.close()
    assert len(backend.prefix_cache) == 0


def test_no_prefix_without_frames_and_none_left_by_warm_up(cached: TransformersBackend) -> None:
    assert cached.prefix_cache is not None
    empty = ScoreRequest(Window("a", 1, 0.0, 8.0, (), 0.0), PROFILES["surveillance"])
    cached.score([empty])
    assert len(cached.prefix_cache) == 0
    cached.warm_up()
    assert len(cached.prefix_cache) == 0


# --- reserved KV and the greedy loop --------------------------------------------------------------


def test_reserved_layer_holds_what_dynamic_layer_holds() -> None:
    reserved, dynamic = ReservedLayer(capacity=3), DynamicLayer()  # type: ignore[no-untyped-call]
    torch.manual_seed(0)
    for length in (2, 1, 4, 1):  # past the reservation: the buffers grow
        keys, values = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        got = reserved.update(keys, values)
        want = dynamic.update(keys, values)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 8


@pytest.mark.parametrize(
    ("reserve", "check_every"),
    [(None, 1), (0, 1), (200, 3)],
    ids=["dynamic-cache", "reserve-grows", "check-every-3"],
)
def test_greedy_variants_decode_the_same_tokens(
    cached: TransformersBackend, reserve: int | None, check_every: int
) -> None:
    """Rows of different lengths and limits, all ending at a newline, one generating nothing."""
    checkpoint = cached.checkpoint
    requests = [request("a", 0, 2), request("b", 3, 3, prompt=OTHER), request("c", 1, 1)]
    prompts = [checkpoint.encode(cached.prompt_text(req)) for req in requests]
    with torch.inference_mode():
        features = cached.frame_encoder.encode([req.window for req in requests]).features
    newline = min(checkpoint.newline_ids)
    plans = [RowPlan(9, one_line=True), RowPlan(12, one_line=True), RowPlan(0, one_line=True)]

    def decode(decoder: TextDecoder) -> list[list[int]]:
        # lm_head call 1 is the prefill (token 0); call 4 gives every row a newline (token 3).
        with torch.inference_mode(), steer(cached, [{}, {}, {}, {newline: 50.0}]):
            state = decoder.prefill(prompts, features)
            return decoder.greedy(state, plans)

    shipped = decode(TextDecoder(checkpoint, 64))
    variant = decode(TextDecoder(checkpoint, reserve, check_every=check_every))
    assert [len(row) for row in shipped] == [4, 4, 0]  # stopped as soon as all were done
    assert shipped[0][3] == shipped[1][3] == newline
    # Checked less often, the loop may run past the end: the tokens up to it are the same.
    assert [row[:4] for row in variant] == shipped


def test_one_and_ten_with_a_cached_prefix(cached: TransformersBackend) -> None:
    """The "1" -> "0"? step and the hidden "1" work on rows whose prefix came from the cache."""
    one, zero = digit(cached, 1), digit(cached, 0)
    cached.score([request("a", 0, 2, below=11)])
    req = request("a", 1, 2)
    with steer(cached, [{one: 30.0}, {zero: 30.0}]):
        score = cached.score([req])[0]
    assert score.significance == 10
    assert score.raw == f" 10{DESCRIPTION_PREFIX}" + reference_generate(cached, req, "10")
