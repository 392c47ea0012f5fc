"""TransformersBackend on a tiny random SmolVLM2: exact fast path, frame cache, batching, errors."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

from streamd.config import ModelConfig
from streamd.domain import Frame, Prompt, ScoreRequest, Window
from streamd.errors import ModelError
from streamd.scoring.base import ScoringBackend
from streamd.scoring.prompt import DESCRIPTION_PREFIX, PROFILES, clean_description, parse_answer
from streamd.scoring.smolvlm.checkpoint import best_frame_index, find_digit_tokens, plain_encoder
from streamd.scoring.smolvlm.vision_cache import FrameFeatureCache
from streamd.scoring.transformers_checkpoint import resolve_dtype
from streamd.scoring.transformers_impl import TransformersBackend
from tests.tiny_smolvlm import (
    IMAGE_SEQ_LEN,
    IMAGE_SIZE,
    build_tiny_smolvlm,
    tiny_model_dir,
    token_id,
)

__all__ = ["tiny_model_dir"]  # the session fixture, until conftest imports it

MAX_NEW_TOKENS = 12
QUESTION = PROFILES["surveillance"]


def make_backend(directory: Path, **kwargs: float) -> TransformersBackend:
    config = ModelConfig(id=str(directory), dtype="float32", max_new_tokens=MAX_NEW_TOKENS)
    backend = TransformersBackend(config, **kwargs)  # type: ignore[arg-type]
    backend.load()
    return backend


@pytest.fixture
def backend(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    """fp32, and every answer read from the digits: random weights give digits ~2% of the mass."""
    loaded = make_backend(tiny_model_dir, min_digit_mass=0.0)
    yield loaded
    loaded.close()


def frame(stream: str, index: int, seed: int | None = None) -> Frame:
    rng = np.random.default_rng(index if seed is None else seed)
    image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Frame(stream, index, float(index), 1_700_000_000.0 + index, image)


def request(
    stream: str, first: int, count: int, *, prompt: Prompt = QUESTION, below: int | None = None
) -> ScoreRequest:
    frames = tuple(frame(stream, i) for i in range(first, first + count))
    window = Window(stream, first + 1, float(first), float(first + count), frames, 0.0)
    return ScoreRequest(window, prompt, describe_below=below)


class VisionCounter:
    """Counts vision-encoder calls and the frames they encode, with a forward hook."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.calls = 0
        self.frames = 0
        vision = backend.checkpoint.model.model.vision_model
        self._handle = vision.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(
        self,
        module: object,
        args: tuple[torch.Tensor, ...],
        kwargs: dict[str, torch.Tensor],
        output: object,
    ) -> None:
        self.calls += 1
        pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        self.frames += pixels.shape[0]

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def steer(
    backend: TransformersBackend, plan: list[dict[int, float]]
) -> Iterator[list[torch.Tensor]]:
    """Set logits of the k-th lm_head call: ``plan[k]`` maps token id -> logit; then run free.

    Call 1 is the prefill (the first digit), call 2 the "1" -> "0"? step when it happens, then
    the answer's tokens. Yields the list of every call's (unsteered) last-position logits.
    """
    seen: list[torch.Tensor] = []

    def hook(module: object, args: object, output: torch.Tensor) -> torch.Tensor | None:
        seen.append(output[:, -1].clone())
        step = plan[len(seen) - 1] if len(seen) <= len(plan) else {}
        if not step:
            return None
        output = output.clone()
        for token, value in step.items():
            output[..., token] = value
        return output

    handle = backend.checkpoint.model.lm_head.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def reference_logits(backend: TransformersBackend, req: ScoreRequest, answer: str) -> torch.Tensor:
    """Next-token logits of the full forward (no cache) after ``answer`` + DESCRIPTION_PREFIX."""
    checkpoint = backend.checkpoint
    ids = torch.tensor([checkpoint.encode(backend.prompt_text(req) + answer + DESCRIPTION_PREFIX)])
    pixels = backend.frame_encoder.pixel_values([f.image for f in req.window.frames])
    with torch.inference_mode():
        output = checkpoint.model(
            input_ids=ids,
            pixel_values=pixels[None],
            attention_mask=torch.ones_like(ids),
            logits_to_keep=1,
        )
    logits: torch.Tensor = output.logits[:, -1].float()
    return logits


def digit(backend: TransformersBackend, value: int) -> int:
    tokens = backend.digit_tokens
    assert tokens is not None
    return tokens.digit_ids[value]


def reference_generate(backend: TransformersBackend, req: ScoreRequest, answer: str) -> str:
    """transformers' own greedy generate() after the prompt (which ends in the lead), ``answer``
    and the description prefix: pixels and all, no vision cache."""
    checkpoint = backend.checkpoint
    model = checkpoint.model
    assert isinstance(model, SmolVLMForConditionalGeneration)
    text = backend.prompt_text(req) + answer + DESCRIPTION_PREFIX
    ids = torch.tensor([checkpoint.encode(text)])
    pixels = backend.frame_encoder.pixel_values([f.image for f in req.window.frames])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            pixel_values=pixels[None],
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=sorted(checkpoint.stop_ids),
        )
    generated = checkpoint.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return str(generated).split("\n", 1)[0]


# --- loading -------------------------------------------------------------------------------------


def test_loads_from_a_directory(backend: TransformersBackend, tiny_model_dir: Path) -> None:
    assert isinstance(backend, ScoringBackend)
    assert backend.name == "transformers"
    assert backend.describe() == f"{tiny_model_dir} on cpu (float32, {backend.threads} threads)"
    assert backend.input_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert backend.max_batch == 4
    # SmolLM-style tokenizer: "Significance: 8" is ":" "Ġ" "8", so the score follows a space.
    assert backend.digit_tokens is not None
    assert backend.digit_tokens.lead == " "


def test_missing_directory_fails_fast_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    backend = TransformersBackend(ModelConfig(id=str(missing)))
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        backend.load()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert str(missing) in message
    assert "\n" not in message


def test_uncached_hub_id_offline_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    backend = TransformersBackend(ModelConfig(id="streamd-tests/not-a-model"))
    with pytest.raises(ModelError, match=r"streamd-tests/not-a-model.*hf download") as caught:
        backend.load()
    assert "\n" not in str(caught.value)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not SmolVLM2"):
        TransformersBackend(ModelConfig(id=str(tmp_path))).load()


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        TransformersBackend(ModelConfig(id=str(tmp_path))).load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"set model\.device to auto or cpu"):
        TransformersBackend(ModelConfig(id=str(tiny_model_dir), device="cuda")).load()


def test_auto_dtype_follows_the_hardware() -> None:
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    # bf16 only with AMX: the kernel's CPU flags are the independent source of truth.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        amx = "amx_bf16" in cpuinfo.read_text(errors="replace")
        expected = torch.bfloat16 if amx else torch.float32
        assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_score_before_load_is_a_model_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="not loaded"):
        TransformersBackend(ModelConfig(id=str(tiny_model_dir))).score([request("a", 0, 1)])


# --- prompt and exactness ------------------------------------------------------------------------


def test_prompt_text_and_tokens(backend: TransformersBackend) -> None:
    req = request("a", 3, 2, prompt=Prompt(system="Be brief.", question="What happens?"))
    image = "<fake_token_around_image><global-img>" + "<image>" * IMAGE_SEQ_LEN
    image += "<fake_token_around_image>"
    assert backend.prompt_text(req) == (
        "<|im_start|>System: Be brief.<end_of_utterance>\n"
        "User: You are provided the following series of two frames"
        " from a 0:00:02 [H:MM:SS] video.\n"
        f"\nFrame from 00:00:{image}\nFrame from 00:01:{image}"
        "\n\nWhat happens?<end_of_utterance>\nAssistant: Significance: "
    )
    checkpoint = backend.checkpoint
    ids = checkpoint.encode(backend.prompt_text(req))
    assert ids.count(checkpoint.image_token_id) == 2 * IMAGE_SEQ_LEN
    tokenizer = checkpoint.tokenizer
    for special, count in [
        ("<|im_start|>", 1),
        ("<fake_token_around_image>", 4),
        ("<global-img>", 2),
        ("<end_of_utterance>", 2),
    ]:
        assert ids.count(token_id(tokenizer, special)) == count, special


def test_pixels_are_the_image_processors(
    backend: TransformersBackend, tiny_model_dir: Path
) -> None:
    images = [frame("a", i).image for i in range(3)]
    processor = SmolVLMImageProcessorPil.from_pretrained(tiny_model_dir)
    expected = processor(images, return_tensors="pt")  # one sample of three images
    assert torch.equal(backend.frame_encoder.pixel_values(images), expected.pixel_values[0])


def test_cached_path_logits_equal_the_full_forward(backend: TransformersBackend) -> None:
    req = request("a", 0, 3)
    backend.score([request("a", 0, 2)])  # frames 0 and 1 come from the cache, 2 is new
    fast = backend.next_token_logits([req])
    checkpoint = backend.checkpoint
    ids = torch.tensor([checkpoint.encode(backend.prompt_text(req))])
    pixels = backend.frame_encoder.pixel_values([f.image for f in req.window.frames])
    with torch.inference_mode():
        # logits_to_keep=1 as the fast path: lm_head over 1 row vs all rows rounds differently.
        full = checkpoint.model(
            input_ids=ids,
            pixel_values=pixels[None],
            attention_mask=torch.ones_like(ids),
            logits_to_keep=1,
        ).logits[:, -1]
    assert torch.equal(fast, full.float())


def test_description_equals_transformers_generate(backend: TransformersBackend) -> None:
    req = request("a", 0, 3)
    score = backend.score([req])[0]
    assert score.significance is not None
    expected = reference_generate(backend, req, str(score.significance))
    assert expected  # some text to compare: no newline or stop token came first
    assert score.raw == f" {score.significance}{DESCRIPTION_PREFIX}{expected}"
    assert score.description == clean_description(expected)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("ten", 10), ("one", 1), ("one_loses", 7)],
)
def test_one_and_ten(backend: TransformersBackend, name: str, expected: int) -> None:
    one, zero, five, seven = (digit(backend, d) for d in (1, 0, 5, 7))
    plans = {
        "ten": [{one: 30.0}, {zero: 30.0}],
        "one": [{one: 30.0}],
        # P("1") = .55 beats P("7") = .45, but then P("0" | "1") = .5: 1 and 10 get .275 each.
        "one_loses": [{one: 30.0, seven: 29.8}, {zero: 30.0, five: 30.0}],
    }
    req = request("a", 0, 2)
    with steer(backend, plans[name]) as seen:
        score = backend.score([req])[0]
    assert score.significance == expected
    # Prefill, the "0"? step, then the answer's tokens: from there on the context must be
    # exactly the answer's, with no trace of a "1" that was tried and dropped. (Chunked with a
    # cache vs in one go: equal up to float rounding; a stray token moves logits by ~1e-2.)
    after_answer = reference_logits(backend, req, str(expected))
    torch.testing.assert_close(seen[2], after_answer, rtol=0, atol=1e-5)
    assert score.raw == f" {expected}{DESCRIPTION_PREFIX}" + reference_generate(
        backend, req, str(expected)
    )


# --- vision cache --------------------------------------------------------------------------------


def test_overlapping_windows_reuse_frames(backend: TransformersBackend) -> None:
    counter = VisionCounter(backend)
    first = backend.score([request("a", 0, 4)])[0]
    second = backend.score([request("a", 2, 4)])[0]
    counter.close()
    assert (first.timings.vision_hits, first.timings.vision_misses) == (0, 4)
    assert (second.timings.vision_hits, second.timings.vision_misses) == (2, 2)
    assert counter.frames == 6  # frames 0-5, each once
    assert counter.calls == 2
    assert first.timings.vision_s > 0
    assert first.timings.prefill_s > 0
    assert first.timings.generate_s > 0


def test_cache_stays_bounded_over_100_windows(backend: TransformersBackend) -> None:
    counter = VisionCounter(backend)
    for n in range(50):
        backend.score([request("a", 2 * n, 6, below=11), request("b", 2 * n, 6, below=11)])
        assert len(backend.cache) <= 12  # one window's frames per stream
    counter.close()
    assert counter.frames == 2 * (2 * 49 + 6)  # every frame of both streams exactly once
    assert counter.calls == 50


def test_frames_shared_within_one_batch_are_encoded_once(backend: TransformersBackend) -> None:
    counter = VisionCounter(backend)
    scores = backend.score([request("a", 0, 3, below=11), request("b", 0, 3, below=11)])
    counter.close()
    assert counter.calls == 1
    assert counter.frames == 6
    assert [s.timings.vision_misses for s in scores] == [3, 3]


def test_feature_cache_lru_and_eviction() -> None:
    cache = FrameFeatureCache(capacity=3)
    for index in range(3):
        cache.put(("a", index), torch.zeros(1))
    assert cache.get(("a", 0)) is not None  # now the most recently used
    cache.put(("b", 0), torch.zeros(1))
    assert ("a", 1) not in cache
    assert ("a", 0) in cache
    assert cache.evict_before("a", 3) == 2
    assert len(cache) == 1
    cache.discard_stream("b")
    assert len(cache) == 0


def test_warm_up_leaves_nothing_cached(backend: TransformersBackend) -> None:
    backend.warm_up()
    assert len(backend.cache) == 0


# --- batching, answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("plan_name", ["free", "ten", "one_loses"])
def test_batched_equals_one_by_one(tiny_model_dir: Path, plan_name: str) -> None:
    batched_backend = make_backend(tiny_model_dir, min_digit_mass=0.0)
    single_backend = make_backend(tiny_model_dir, min_digit_mass=0.0)
    one, zero, five, seven = (digit(batched_backend, d) for d in (1, 0, 5, 7))
    plan = {
        "free": [],
        "ten": [{one: 30.0}, {zero: 30.0}],
        "one_loses": [{one: 30.0, seven: 29.8}, {zero: 30.0, five: 30.0}],
    }[plan_name]
    # Different lengths (left padding), prompts and describe_below (rows stop at different steps).
    requests = [
        request("a", 0, 2),
        request("b", 5, 4, prompt=PROFILES["sports"]),
        request("c", 9, 3, below=11),
        request("d", 1, 1, prompt=Prompt(system="", question="Anything?")),
    ]
    with steer(batched_backend, plan) as batched_seen:
        batched = batched_backend.score(requests)
    single = []
    for row, req in enumerate(requests):
        with steer(single_backend, plan) as single_seen:
            single.extend(single_backend.score([req]))
        # The logits after the answer's tokens (the description's first): left padding and
        # masked slots change nothing but float rounding.
        after_answer = 2 if plan else 1
        if req.describe_below is None:
            torch.testing.assert_close(
                batched_seen[after_answer][row], single_seen[after_answer][0], rtol=0, atol=1e-5
            )
    assert [(s.significance, s.raw, s.description) for s in batched] == [
        (s.significance, s.raw, s.description) for s in single
    ]
    assert batched[2].description == ""


def test_describe_below_skips_the_description(backend: TransformersBackend) -> None:
    quiet, described = backend.score([request("a", 0, 2, below=11), request("b", 0, 2, below=1)])
    assert quiet.significance is not None
    assert (quiet.description, quiet.raw) == ("", f" {quiet.significance}")
    assert described.raw.startswith(f" {described.significance}{DESCRIPTION_PREFIX}")


def test_significance_is_1_to_10_or_none(backend: TransformersBackend) -> None:
    for n in range(8):
        frames = tuple(frame("s", n * 4 + i, seed=1000 + n * 4 + i) for i in range(1 + n % 4))
        window = Window("s", n, frames[0].pts_s, frames[-1].pts_s + 1, frames, 0.0)
        score = backend.score([ScoreRequest(window, QUESTION, describe_below=11)])[0]
        assert score.significance is None or 1 <= score.significance <= 10


def test_window_without_frames_is_scored_from_text(backend: TransformersBackend) -> None:
    empty = ScoreRequest(Window("a", 1, 0.0, 8.0, (), 0.0), QUESTION)
    scores = backend.score([empty, request("b", 0, 2)])
    assert [s.timings.vision_misses for s in scores] == [0, 2]
    assert scores[0].best_frame == 0
    assert scores[0].significance is None or 1 <= scores[0].significance <= 10


def test_tokenizer_without_isolated_digits_falls_back_to_free_text(tmp_path: Path) -> None:
    directory = build_tiny_smolvlm(tmp_path / "merged-digits", isolate_digits=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.tokenize(" Significance: 10")[-1] == "Ġ10"  # what defeats a logit read
    backend = make_backend(directory, min_digit_mass=0.0)
    assert backend.digit_tokens is None
    assert find_digit_tokens(plain_encoder(tokenizer.encode)) is None
    score = backend.score([request("a", 0, 2)])[0]
    assert score.raw  # random weights: gibberish, never a number made up for it
    assert score.significance is None
    assert parse_answer(score.raw, after_prefix=True).significance is None


def test_unlikely_digits_fall_back_to_free_text(tiny_model_dir: Path) -> None:
    backend = make_backend(tiny_model_dir)  # default min_digit_mass: random weights fall short
    score = backend.score([request("a", 0, 2)])[0]
    assert score.significance == parse_answer(score.raw, after_prefix=True).significance is None
    assert score.raw.startswith(" ")  # the free text continues after "Significance: "


def test_best_frame_is_the_biggest_change() -> None:
    still = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    bright = np.full_like(still, 200)
    frames = [Frame("a", i, float(i), 0.0, image) for i, image in enumerate([still, still, bright])]
    assert best_frame_index(frames) == 2
    assert best_frame_index(frames[:1]) == 0


def test_rejects_frames_of_the_wrong_size(backend: TransformersBackend) -> None:
    small = Frame("a", 0, 0.0, 0.0, np.zeros((8, 8, 3), np.uint8))
    window = Window("a", 1, 0.0, 1.0, (small,), 0.0)
    with pytest.raises(ValueError, match="the model takes uint8"):
        backend.score([ScoreRequest(window, QUESTION)])


def test_close_releases_the_model(tiny_model_dir: Path) -> None:
    backend = make_backend(tiny_model_dir)
    backend.score([request("a", 0, 1, below=11)])
    backend.close()
    assert len(backend.cache) == 0
    with pytest.raises(ModelError, match="not loaded"):
        backend.score([request("a", 0, 1)])
