"""The ``openai`` backend: pure request building and answer reading, then a real mlx-vlm server.

The server tests run mlx-vlm's OpenAI-compatible server (``.venv-mlx``, as ``.ci/run`` builds
it) on the tiny random SmolVLM2, once per module, with a TCP proxy of our own in front of it
for the faults. They skip without ``.venv-mlx``, except under CI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr, ValidationError

from streamd import cli
from streamd.config import BASE_DIR
from streamd.domain import Frame, Prompt, ScoreRequest, Window
from streamd.errors import ExitCode, ModelError
from streamd.highlights import expected_windows
from streamd.metrics import Metrics
from streamd.scoring.base import ScoringBackend
from streamd.scoring.openai_config import OpenAIModelConfig, resolve_api_key
from streamd.scoring.openai_impl import JpegCache, OpenAIBackend
from streamd.scoring.openai_request import (
    PREFIXED_SCORE_MAX_TOKENS,
    SCORE_MAX_TOKENS,
    chat_body,
    description_prefix,
    digit_probabilities,
    error_message,
    looks_tiled,
    read_completion,
    retry_after_s,
    served_model_ids,
    user_content,
)
from streamd.scoring.prompt import PROFILES, render_video_prompt
from streamd.scoring.runner import ModelRunner
from tests.frames import bars
from tests.media import ClipSet
from tests.openai_server import FaultProxy, MlxVlmServer, free_port, require_mlx_server

KEY = "sk-streamd-test-0123456789abcdef"
PROMPT = PROFILES["surveillance"]
SIZE = 512


# --- pure: requests -----------------------------------------------------------------------------


def _text_of(content: Sequence[object], image: str) -> str:
    parts = []
    for part in content:
        assert isinstance(part, dict)
        parts.append(part["text"] if part["type"] == "text" else image)
    return "".join(parts)


def _urls(content: Sequence[object]) -> list[str]:
    parts = [part for part in content if isinstance(part, dict) and "image_url" in part]
    return [part["image_url"]["url"] for part in parts]


def test_user_turn_is_smolvlm2_video_prompt_with_images_in_place() -> None:
    offsets = [0.0, 1.0, 2.5, 61.0]
    content = user_content(PROMPT, offsets, 64.0, ["data:a", "data:b", "data:c", "data:d"])
    image = "<fake_token_around_image><global-img>" + "<image>" * 64 + "<fake_token_around_image>"
    rendered = render_video_prompt(PROMPT, offsets, 64.0, 64, answer_prefix="")
    user = rendered.split("User: ", 1)[1].removesuffix("<end_of_utterance>\nAssistant:")
    assert _text_of(content, image) == user
    assert _urls(content) == ["data:a", "data:b", "data:c", "data:d"]  # time order
    assert "\nFrame from 01:01:" in user


def test_chat_body_is_greedy_with_top_logprobs_and_extra_body_last() -> None:
    content = user_content(PROMPT, [0.0], 1.0, ["data:x"])
    body = chat_body("m", PROMPT, content, 64, {"temperature": 0.5, "top_k": 1})
    assert body["model"] == "m"
    assert body["messages"] == [
        {"role": "system", "content": PROMPT.system},
        {"role": "user", "content": content},
    ]
    assert (body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (64, True, 20)
    assert (body["temperature"], body["top_k"]) == (0.5, 1)  # verbatim, may override
    no_system = chat_body("m", Prompt("", "q?"), content, 8, {})
    assert no_system["messages"] == [{"role": "user", "content": content}]


def test_a_continued_answer_starts_the_assistant_message() -> None:
    content = user_content(PROMPT, [0.0], 1.0, ["data:x"])
    body = chat_body("m", PROMPT, content, 3, {}, assistant_prefix="Significance:")
    assert body["messages"] == [
        {"role": "system", "content": PROMPT.system},
        {"role": "user", "content": content},
        {"role": "assistant", "content": "Significance:"},
    ]
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert "continue_final_message" not in chat_body("m", PROMPT, content, 3, {})
    # The description continues the score as the local backends write it.
    assert description_prefix(10) == "Significance: 10\nDescription:"
    bare = _body(" 7", None)
    assert read_completion(bare, after_prefix=True).significance == 7
    assert read_completion(bare).significance is None  # a bare number is no score


@pytest.mark.parametrize(
    ("prompt_tokens", "frames", "tiled"),
    [
        (252, 8, False),  # the tiny model, measured: 29 tokens a frame
        (8 * 64 + 600, 8, False),  # SmolVLM2-256M, one tile a frame
        (8 * 13 * 64, 8, True),  # 1080p frames tiled: 13 tiles each
        (None, 8, False),
        (10_000, 0, False),
    ],
)
def test_tiling_is_noticed_from_prompt_tokens(
    prompt_tokens: int | None, frames: int, tiled: bool
) -> None:
    assert looks_tiled(prompt_tokens, frames, text_chars=500) is tiled


# --- pure: answers (shapes as mlx-vlm 0.7.10 returned them) -------------------------------------


def _position(token: str, alternatives: dict[str, float]) -> dict[str, object]:
    top = [
        {"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
        for t, p in alternatives.items()
    ]
    return {"token": token, "logprob": math.log(alternatives.get(token, 1e-9)), "top_logprobs": top}


def _body(text: str, positions: list[dict[str, object]] | None) -> dict[str, object]:
    logprobs = None if positions is None else {"content": positions}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": text, "reasoning_content": None},
                "logprobs": logprobs,
            }
        ],
        "usage": {"prompt_tokens": 78, "completion_tokens": 9, "total_tokens": 87},
    }


def _answer(pieces: list[tuple[str, dict[str, float]]]) -> dict[str, object]:
    positions = [_position(token, alts) for token, alts in pieces]
    return _body("".join(token for token, _ in pieces), positions)


SIGNIFICANCE = [
    ("Sign", {"Sign": 0.9}),
    ("ificance", {"ificance": 0.9}),
    (":", {":": 0.9}),
    (" ", {" ": 0.9}),
]
DESCRIBED = [
    ("\n", {"\n": 0.9}),
    ("Description", {"Description": 0.9}),
    (":", {":": 1.0}),
    (" A car.", {" A car.": 1.0}),
]


@pytest.mark.parametrize(
    ("digits", "expected"),
    [
        ([("8", {"8": 0.6, "7": 0.3, "1": 0.05})], 8),
        ([("7", {"7": 0.5, "8": 0.45})], 7),
        ([("1", {"1": 0.7, "3": 0.2}), ("0", {"0": 0.9, "\n": 0.1})], 10),
        ([("1", {"1": 0.7, "3": 0.2}), ("\n", {"0": 0.1, "\n": 0.9})], 1),
        ([("1", {"1": 0.5, "6": 0.4}), ("0", {"0": 0.6})], 6),  # P(10)=0.3 < P(6)=0.4
        ([("3", {"3": 0.3, "a": 0.6})], None),  # digits below the mass: the text (8) is not read
        ([("0", {"0": 0.9})], None),  # "0" is no score, and no 1-9 to read
    ],
)
def test_significance_is_read_from_digit_probabilities(
    digits: list[tuple[str, dict[str, float]]], expected: int | None
) -> None:
    completion = read_completion(_answer(SIGNIFICANCE + digits + DESCRIBED))
    assert completion.from_logprobs is (expected is not None)
    if expected is not None:
        assert completion.significance == expected
    assert completion.description == "A car."
    assert (completion.prompt_tokens, completion.completion_tokens) == (78, 9)


def test_text_is_parsed_when_logprobs_say_nothing() -> None:
    text = "Significance: 8\nDescription: A person climbs the fence."
    for body in (_body(text, None), _body(text, []), _answer([(text, {})])):
        completion = read_completion(body)
        assert (completion.significance, completion.from_logprobs) == (8, False)
        assert completion.description == "A person climbs the fence."


def test_a_number_in_prose_is_not_the_score() -> None:
    prose = [
        ("Frame", {"Frame": 0.9}),
        (" ", {" ": 0.9}),
        ("2", {"2": 0.99}),
        (" is dark", {"x": 0.5}),
    ]
    assert read_completion(_answer(prose)).significance is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"choices": []},
        {"choices": [{"message": None}]},
        {"choices": [{"message": {"content": None}, "logprobs": {"content": "x"}}]},
        [1, 2],
        "text",
    ],
)
def test_malformed_completions_are_unreadable_not_errors(body: object) -> None:
    completion = read_completion(body)
    assert (completion.text, completion.significance, completion.prompt_tokens) == ("", None, None)


def test_digit_probabilities_sum_duplicates_and_skip_junk() -> None:
    top = [
        {"token": "7", "logprob": math.log(0.25)},
        {"token": " 7", "logprob": math.log(0.25)},
        {"token": "\u0667", "logprob": 0.0},  # ARABIC-INDIC SEVEN is no ASCII digit
        {"token": 7, "logprob": 0.0},
        {"token": "3"},
    ]
    p = digit_probabilities(top)
    assert p is not None
    assert p[7] == pytest.approx(0.5)
    assert sum(p) == pytest.approx(0.5)
    assert digit_probabilities([]) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"detail": "Protected conversation exceeds the available context budget."},
            "Protected conversation exceeds the available context budget.",
        ),
        (
            {"error": {"message": "At most 8 image(s) may be provided", "type": "BadRequestError"}},
            "At most 8 image(s) may be provided",
        ),
        (
            {"object": "error", "message": "This model's maximum context length is 2048"},
            "This model's maximum context length is 2048",
        ),
        (
            {"error": {"code": 400, "message": "the request exceeds the available context size"}},
            "the request exceeds the available context size",
        ),
        ({"error": "model 'x' not found"}, "model 'x' not found"),
        (
            {"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required"}]},
            "Field required",
        ),
        (None, "<html>fallback"),
    ],
)
def test_error_messages_of_each_server_shape(body: object, expected: str) -> None:
    assert error_message(body, "<html>fallback\nmore") == expected


def test_error_messages_are_cut_to_one_short_line() -> None:
    assert len(error_message({"detail": "x" * 1000}, "")) == 200


@pytest.mark.parametrize(
    ("header", "attempt", "expected"),
    [
        ("2", 0, 2.0),
        ("0.5", 3, 0.5),
        ("120", 0, 10.0),
        (None, 0, 0.5),
        (None, 2, 2.0),
        (None, 9, 10.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 1, 1.0),
        ("-1", 0, 0.5),
    ],
)
def test_retry_after_is_honoured_and_capped(
    header: str | None, attempt: int, expected: float
) -> None:
    assert retry_after_s(header, attempt, cap_s=10.0) == expected


def test_served_model_ids() -> None:
    body = {"object": "list", "data": [{"id": "/m/tiny", "object": "model"}, {"object": "model"}]}
    assert served_model_ids(body) == ["/m/tiny"]
    assert served_model_ids({"data": "x"}) == []


# --- pure: config and frames --------------------------------------------------------------------


def test_config_defaults_and_limits() -> None:
    config = OpenAIModelConfig()
    assert (config.backend, config.max_in_flight, config.timeout_s, config.extra_body) == (
        "openai",
        8,
        60.0,
        {},
    )
    assert config.max_new_tokens == 64
    assert (
        OpenAIModelConfig(base_url="http://gpu-box:8000/v1/").base_url == "http://gpu-box:8000/v1"
    )
    for bad in (
        {"max_in_flight": 0},
        {"max_in_flight": 257},
        {"base_url": "gpu-box:8000"},
        {"base_url": "ftp://x/v1"},
        {"surprise": 1},
        {"timeout_s": 0},
        {"api_key": KEY, "api_key_file": "/k"},
    ):
        with pytest.raises(ValidationError):
            OpenAIModelConfig.model_validate(bad)
    with pytest.raises(ValidationError):
        config.max_in_flight = 2  # type: ignore[misc]  # frozen


def test_api_key_sources_and_secrecy(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{KEY}\n")
    from_file = OpenAIModelConfig.model_validate(
        {"api_key_file": "key"}, context={BASE_DIR: tmp_path}
    )
    assert from_file.api_key_file == tmp_path / "key"
    assert resolve_api_key(from_file, {}) == SecretStr(KEY)
    inline = OpenAIModelConfig(api_key=SecretStr(KEY))
    assert resolve_api_key(inline, {"OPENAI_API_KEY": "other"}) == SecretStr(KEY)
    env = resolve_api_key(OpenAIModelConfig(), {"OPENAI_API_KEY": KEY})
    assert env is not None
    assert env.get_secret_value() == KEY
    assert resolve_api_key(OpenAIModelConfig(), {}) is None
    for shown in (repr(inline), str(inline), inline.model_dump_json(), repr(env)):
        assert KEY not in shown
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ModelError, match="is empty"):
        resolve_api_key(OpenAIModelConfig(api_key_file=tmp_path / "empty"), {})
    with pytest.raises(ModelError, match=r"cannot read model\.api_key_file"):
        resolve_api_key(OpenAIModelConfig(api_key_file=tmp_path / "missing"), {})


def _frame(stream: str, index: int, pts_s: float | None = None) -> Frame:
    image = np.tile(bars(index * 3, size=SIZE // 8), (8, 8, 1))
    return Frame(stream, index, float(index) if pts_s is None else pts_s, 0.0, image, (1920, 1080))


def _request(
    stream: str,
    first: int,
    frames: int = 4,
    prompt: Prompt = PROMPT,
    describe_below: int | None = None,
) -> ScoreRequest:
    window_frames = tuple(_frame(stream, i) for i in range(first, first + frames))
    window = Window(stream, first + 1, float(first), float(first + frames), window_frames, 0.0)
    return ScoreRequest(window, prompt, describe_below)


def test_jpeg_cache_encodes_a_frame_once_and_drops_the_oldest() -> None:
    cache = JpegCache(capacity=2)
    first, hit = cache.uri(_frame("a", 0))
    assert not hit
    assert first.startswith("data:image/jpeg;base64,/9j/")  # JPEG's SOI marker, base64
    cache.uri(_frame("b", 0))  # same index, other stream: another frame
    assert cache.uri(_frame("a", 0)) == (first, True)  # now the most recently used
    cache.uri(_frame("a", 1))  # full: drops ("b", 0), the least recently used
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    assert cache.uri(_frame("a", 0))[1]
    assert not cache.uri(_frame("b", 0))[1]


# --- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlx_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlxVlmServer]:
    """mlx-vlm's server on the tiny SmolVLM2, once for the module."""
    require_mlx_server()
    log = tmp_path_factory.mktemp("mlx-server") / "server.log"
    with MlxVlmServer(tiny_model_dir, log) as server:
        yield server


@pytest.fixture
def proxy(mlx_server: MlxVlmServer) -> Iterator[FaultProxy]:
    """A TCP proxy in front of the server, for faults."""
    with FaultProxy(mlx_server.port) as running:
        yield running


def _backend(server: MlxVlmServer | FaultProxy, model_id: str, **settings: object) -> OpenAIBackend:
    config = OpenAIModelConfig.model_validate(
        {"id": model_id, "base_url": server.base_url, **settings}
    )
    return OpenAIBackend(config, environ={})


@pytest.fixture
def backend(mlx_server: MlxVlmServer) -> Iterator[OpenAIBackend]:
    """A loaded backend talking straight to the server."""
    loaded = _backend(mlx_server, mlx_server.model_id)
    loaded.load()
    yield loaded
    loaded.close()


def test_scores_windows_in_order(backend: OpenAIBackend, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(backend, ScoringBackend)
    assert backend.input_size == (SIZE, SIZE)
    backend.warm_up()
    # Windows sent together have the same number of frames: mlx-vlm 0.7.10's server fails
    # (500, "[concatenate] ... dimensions must match") on concurrent requests that differ.
    requests = [_request("cam", 0), _request("cam", 2), _request("yard", 0)]
    scores = backend.score(requests)
    assert len(scores) == len(requests)
    for request, score in zip(requests, scores, strict=True):
        assert score.significance is None or 1 <= score.significance <= 10
        assert isinstance(score.raw, str)
        assert score.raw  # the random model always says something
        assert 0 <= score.best_frame < len(request.window.frames)
    # Frames 2 and 3 of "cam" are in both of its windows: encoded once.
    hits = sum(score.timings.vision_hits for score in scores)
    misses = sum(score.timings.vision_misses for score in scores)
    assert (hits, misses) == (2, 10)
    assert backend.score([_request("cam", 0)])[0].timings.vision_hits == 4
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # one tile a frame


async def test_the_runner_keeps_requests_in_flight(mlx_server: MlxVlmServer) -> None:
    # The runner, not the backend, keeps max_in_flight requests open: one window each, every
    # one answered as soon as it returns.
    backend = _backend(mlx_server, mlx_server.model_id, max_in_flight=4)
    assert (backend.max_batch, backend.max_in_flight) == (1, 4)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    runner = ModelRunner(backend, metrics, backend.config.stall_timeout_s)
    await runner.start()
    scheduler = asyncio.create_task(runner.run())
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, int(registry.get_sample_value("streamd_model_calls_in_flight") or 0))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        requests = [_request(f"cam{i}", 10 * i) for i in range(8)]
        async with asyncio.timeout(60):
            scores = await asyncio.gather(*(runner.score(r) for r in requests))
    finally:
        watcher.cancel()
        scheduler.cancel()
        await asyncio.gather(watcher, scheduler, return_exceptions=True)
        await runner.close()
    assert len(scores) == 8
    assert all(score.raw for score in scores)
    assert peak > 1  # several requests were open at once
    assert peak <= 4
    prompt = registry.get_sample_value("streamd_model_tokens_total", {"type": "prompt"})
    assert prompt is not None
    assert prompt >= 8 * 4 * 29  # 4 frames of 29 tokens each, per window (measured)
    calls = registry.get_sample_value("streamd_model_call_seconds_count")
    assert calls is not None
    assert calls >= 8


async def test_unreachable_server_is_counted_and_shown_in_health(
    mlx_server: MlxVlmServer,
) -> None:
    proxy = FaultProxy(mlx_server.port)
    proxy.start()
    try:
        backend = _backend(proxy, mlx_server.model_id, timeout_s=2.0)
        registry = CollectorRegistry()
        runner = ModelRunner(backend, Metrics(registry), backend.config.stall_timeout_s)
        await runner.start()
        scheduler = asyncio.create_task(runner.run())
        try:
            proxy.stop()
            with pytest.raises(ModelError, match="model server unreachable"):
                await runner.score(_request("cam", 0))
            assert runner.problem == "model server unreachable"
            errors = registry.get_sample_value(
                "streamd_model_errors_total", {"reason": "unreachable"}
            )
            assert errors == 1
            proxy.start()
            score = await runner.score(_request("cam", 0))
            assert score.raw
            assert runner.problem is None  # recovered by itself
        finally:
            scheduler.cancel()
            await asyncio.gather(scheduler, return_exceptions=True)
            await runner.close()
    finally:
        proxy.stop()


def test_significance_from_the_servers_logprobs(
    mlx_server: MlxVlmServer, tiny_model_dir: Path
) -> None:
    # The random model never says a digit by itself: bias it towards "7" (extra_body goes to
    # the server verbatim). "7777" is no score as text, so the 7 is the logprob reading.
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    bias = {str(vocab["7"]): 100}
    backend = _backend(
        mlx_server, mlx_server.model_id, extra_body={"logit_bias": bias}, max_new_tokens=4
    )
    backend.load()
    try:
        (score,) = backend.score([_request("cam", 0)])
    finally:
        backend.close()
    assert score.raw == "7777"
    assert score.significance == 7


@pytest.mark.parametrize("continued", [False, True])
def test_only_windows_at_or_above_describe_below_get_a_description(
    mlx_server: MlxVlmServer, tiny_model_dir: Path, continued: bool
) -> None:
    # Biased to "7", the model scores every window 7 and never stops: the tokens the server
    # generated tell which requests were made. A quiet window costs the score's few tokens.
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    full = 12
    backend = _backend(
        mlx_server,
        mlx_server.model_id,
        extra_body={"logit_bias": {str(vocab["7"]): 100}},
        max_new_tokens=full,
        continue_final_message=continued,
    )
    backend.load()
    try:
        quiet, event, every = backend.score(
            [
                _request("cam", 0, describe_below=8),
                _request("cam", 2, describe_below=7),
                _request("cam", 4),
            ]
        )
    finally:
        backend.close()
    score_tokens = PREFIXED_SCORE_MAX_TOKENS if continued else SCORE_MAX_TOKENS
    assert (quiet.significance, event.significance, every.significance) == (7, 7, 7)
    assert quiet.description == ""
    assert quiet.timings.completion_tokens == score_tokens  # one short request
    assert event.timings.completion_tokens == score_tokens + full  # score, then description
    assert event.description.startswith("7777")
    assert every.timings.completion_tokens == full  # describe_below None: one whole answer
    if continued:
        assert quiet.raw.startswith("Significance:")
        assert event.raw.startswith("Significance: 7\nDescription:")


def test_unknown_model_is_refused_listing_what_is_served(mlx_server: MlxVlmServer) -> None:
    backend = _backend(mlx_server, "HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    with pytest.raises(ModelError) as caught:
        backend.load()
    message = str(caught.value)
    assert "does not serve 'HuggingFaceTB/SmolVLM2-256M-Video-Instruct'" in message
    assert repr(mlx_server.model_id) in message
    assert "set model.id" in message


def test_closed_port_fails_fast_naming_base_url() -> None:
    config = OpenAIModelConfig(
        id="m", base_url=f"http://user:pw@127.0.0.1:{free_port()}/v1", timeout_s=5
    )
    backend = OpenAIBackend(config, environ={"OPENAI_API_KEY": KEY})
    started = time.monotonic()
    with pytest.raises(
        ModelError, match=re.escape("model server unreachable: http://user:***@127.0.0.1:")
    ) as caught:
        backend.load()
    assert time.monotonic() - started < 2
    assert "pw" not in str(caught.value)
    assert KEY not in str(caught.value)
    with pytest.raises(ModelError, match="not loaded"):
        backend.score([_request("cam", 0)])


def test_server_gone_and_back_during_scoring(mlx_server: MlxVlmServer, proxy: FaultProxy) -> None:
    backend = _backend(proxy, mlx_server.model_id, timeout_s=10)
    backend.load()
    try:
        assert len(backend.score([_request("cam", 0)])) == 1
        proxy.stop()
        with pytest.raises(ModelError, match="model server unreachable"):
            backend.score([_request("cam", 0), _request("yard", 0)])
        proxy.start()
        assert len(backend.score([_request("cam", 0)])) == 1  # recovered by itself
    finally:
        backend.close()


def test_busy_server_is_retried_after_retry_after(
    mlx_server: MlxVlmServer, proxy: FaultProxy
) -> None:
    backend = _backend(proxy, mlx_server.model_id, timeout_s=10)
    backend.load()
    try:
        proxy.answer(429, {"Retry-After": "1"}, times=1)
        started = time.monotonic()
        (score,) = backend.score([_request("cam", 0)])
        waited = time.monotonic() - started
        assert score.raw
        assert proxy.answered == 1
        assert waited >= 1.0
    finally:
        backend.close()
    short = _backend(proxy, mlx_server.model_id, timeout_s=2)
    short.load()
    try:
        proxy.answer(503, {"Retry-After": "30"}, times=100)  # waits are capped, then timeout_s
        started = time.monotonic()
        with pytest.raises(ModelError, match=r"no answer within 2s \(busy: 503\)"):
            short.score([_request("cam", 0)])
        assert time.monotonic() - started < 3
    finally:
        short.close()


def test_too_many_frames_is_one_line_naming_the_setting(backend: OpenAIBackend) -> None:
    # 150 frames of the tiny model (29 tokens each) overflow its 4096-token context.
    frames = tuple(_frame("long", i, i * 0.5) for i in range(150))
    request = ScoreRequest(Window("long", 1, 0.0, 75.0, frames, 0.0), PROMPT)
    with pytest.raises(ModelError) as caught:
        backend.score([request])
    message = str(caught.value)
    assert "rejected a window of 150 frames (400: Protected conversation exceeds" in message
    assert "window_s or sample_fps" in message
    assert "\n" not in message


def test_a_tiling_server_is_warned_about_once(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The same tiny checkpoint with image splitting on, as a server's processor defaults to:
    # each 512-px frame becomes 16 tiles and a global image (~17x the tokens).
    require_mlx_server()
    tiled = shutil.copytree(tiny_model_dir, tmp_path / "tiled")
    settings = json.loads((tiled / "preprocessor_config.json").read_text())
    settings.update(do_image_splitting=True, size={"longest_edge": 4 * 64})
    (tiled / "preprocessor_config.json").write_text(json.dumps(settings))
    with MlxVlmServer(tiled, tmp_path / "server.log") as server:
        backend = _backend(server, server.model_id, max_new_tokens=2)
        backend.load()
        try:
            backend.score([_request("cam", 0, frames=8)])
            backend.score([_request("yard", 0, frames=8)])
        finally:
            backend.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "likely tiling frames" in warnings[0]
    assert "--mm-processor-kwargs" in warnings[0]


def test_the_key_never_shows(
    mlx_server: MlxVlmServer, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    config = OpenAIModelConfig(
        id=mlx_server.model_id, base_url=proxy.base_url, api_key=SecretStr(KEY)
    )
    backend = OpenAIBackend(config)
    backend.load()  # mlx-vlm takes any key
    try:
        messages += [backend.describe(), repr(backend), repr(config), str(config.model_dump())]
        too_long = tuple(_frame("long", i, i * 0.5) for i in range(150))
        for fault in ("400", "401", "gone"):
            if fault == "401":
                proxy.answer(401, times=1)
            if fault == "gone":
                proxy.stop()
            request = ScoreRequest(Window("long", 1, 0.0, 75.0, too_long, 0.0), PROMPT)
            with pytest.raises(ModelError) as caught:
                backend.score([request])
            messages.append(str(caught.value))
    finally:
        backend.close()
    proxy.start()
    proxy.answer(403, times=1)
    refused = OpenAIBackend(
        config.model_copy(update={"api_key": None}), environ={"OPENAI_API_KEY": KEY}
    )
    with pytest.raises(ModelError, match=r"refused the API key \(403\)") as caught:
        refused.load()
    messages.append(str(caught.value))
    assert "refused the API key (401)" in messages[-3]
    messages += [record.getMessage() for record in caplog.records]
    assert len(messages) > 8
    assert not [message for message in messages if KEY in message]


@pytest.mark.parametrize("in_flight", [1, 4])
def test_analyze_keeps_windows_in_flight_on_a_model_server(
    mlx_server: MlxVlmServer, clips: ClipSet, tmp_path: Path, in_flight: int
) -> None:
    with FaultProxy(mlx_server.port) as proxy:
        out = tmp_path / "result.json"
        argv = [
            "analyze",
            str(clips.motion.path),
            "--backend",
            "openai",
            "--base-url",
            proxy.base_url,
            "--model",
            mlx_server.model_id,
            "--max-in-flight",
            str(in_flight),
            "--window-s",
            "2",
            "--overlap-s",
            "1",
            "--max-new-tokens",
            "4",
            "--json",
            str(out),
        ]
        assert cli.main(argv) == ExitCode.OK
        accepted = proxy.accepted
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["windows"] == expected_windows(clips.motion.duration_s, 2, 1)
    # Sequential requests reuse one kept-alive connection; overlapping ones need their own.
    if in_flight == 1:
        assert accepted <= 3  # one kept-alive connection, or a few if the server closed one
    else:
        assert accepted > 2
