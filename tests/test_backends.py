"""One conformance suite for every scoring backend, plus what only the mlx-vlm backend needs.

The backends are those of the registry (``streamd.scoring.registry.BACKENDS``): a new one is
tested here without a line of this file changing, once ``model_config`` knows how to make it.
The transformers and mlx backends run the tiny random SmolVLM2 of ``tests.tiny_smolvlm``, and
the openai backend talks to mlx-vlm's OpenAI-compatible server serving it. Building it needs
torch; a venv without torch (the mlx one) gets a prebuilt copy through ``STREAMD_TINY_SMOLVLM``,
else those parameters skip.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from streamd.config import ModelConfig, ModelSection, OpenAIModelConfig
from streamd.domain import Frame, Image, Score, ScoreRequest, StageTimings, Window
from streamd.errors import ModelError
from streamd.scoring import create_backend
from streamd.scoring.base import ScoringBackend
from streamd.scoring.prompt import DESCRIPTION_PREFIX, PROFILES, VideoTokens, render_video_prompt
from streamd.scoring.registry import BACKENDS as REGISTRY
from tests.openai_server import MlxVlmServer, require_mlx_server
from tests.tiny_smolvlm import IMAGE_SEQ_LEN, IMAGE_SIZE

TINY_CHECKPOINT_ENV = "STREAMD_TINY_SMOLVLM"
MAX_NEW_TOKENS = 8
PROMPT = PROFILES["surveillance"]
NEEDS = {"transformers": ("torch", "transformers"), "mlx": ("mlx_vlm",), "openai": ("httpx",)}
MLX_MISSING = "the mlx backend needs mlx_vlm"
"""What each backend imports; a missing one skips its parameters."""
BACKENDS = [pytest.param(name, id=name) for name in REGISTRY]
SMOLVLM_IN_PROCESS = ("transformers", "mlx")


# --- fixtures and builders ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SmolVLM2: ``$STREAMD_TINY_SMOLVLM`` if set, else built here (needs torch)."""
    prebuilt = os.environ.get(TINY_CHECKPOINT_ENV)
    if prebuilt:
        if not (Path(prebuilt) / "config.json").is_file():
            pytest.fail(f"{TINY_CHECKPOINT_ENV}={prebuilt} holds no checkpoint (no config.json)")
        return Path(prebuilt)
    pytest.importorskip(
        "torch",
        reason=f"no tiny SmolVLM2 weights: building them needs torch; set {TINY_CHECKPOINT_ENV}"
        " to a directory written by tests.tiny_smolvlm.build_tiny_smolvlm in a venv with torch",
    )
    from tests.tiny_smolvlm import build_tiny_smolvlm  # noqa: PLC0415 - imports torch

    return build_tiny_smolvlm(tmp_path_factory.mktemp("tiny-smolvlm2"))


@pytest.fixture(scope="session")
def openai_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlxVlmServer]:
    """mlx-vlm's OpenAI-compatible server on the tiny SmolVLM2 (skips without it, outside CI)."""
    require_mlx_server()
    log = tmp_path_factory.mktemp("openai-server") / "server.log"
    with MlxVlmServer(tiny_checkpoint, log) as server:
        yield server


def model_config(name: str, request: pytest.FixtureRequest) -> ModelSection:
    """Skips unless ``name``'s imports and weights are here."""
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module, reason=f"the {name} backend needs {module}")
    if name == "openai":
        server: MlxVlmServer = request.getfixturevalue("openai_server")
        return OpenAIModelConfig(
            id=server.model_id,
            base_url=server.base_url,
            max_new_tokens=MAX_NEW_TOKENS,
            timeout_s=30,
        )
    model_id = "motion" if name == "motion" else str(request.getfixturevalue("tiny_checkpoint"))
    return ModelConfig(
        backend=name, id=model_id, device="cpu", dtype="float32", max_new_tokens=MAX_NEW_TOKENS
    )


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[ScoringBackend]:
    """Each backend, loaded and warmed up once per module, through ``create_backend``."""
    loaded = create_backend(model_config(request.param, request))
    loaded.load()
    loaded.warm_up()
    yield loaded
    loaded.close()


def picture(size: tuple[int, int], seed: int) -> Image:
    """A textured scene at ``(width, height)``: smooth gradients plus a seeded pattern."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256])
    noise = rng.integers(0, 64, (3, height, width))
    return ((base + noise + seed * 97) % 256).astype(np.uint8).transpose(1, 2, 0)


def make_window(images: Sequence[Image], seq: int = 1, start_s: float = 10.0) -> Window:
    """One frame a second from ``start_s``: frame times in the prompt count from the start."""
    frames = tuple(
        Frame("cam", seq * 100 + i, start_s + i, 1_700_000_000.0 + start_s + i, image)
        for i, image in enumerate(images)
    )
    return Window("cam", seq, start_s, start_s + len(images), frames, 1_700_000_000.0 + start_s)


def static_window(size: tuple[int, int]) -> Window:
    return make_window([picture(size, 1)] * 4)


def cut_window(size: tuple[int, int], cut_at: int, count: int, seq: int = 2) -> Window:
    """``count`` frames of one scene, another scene from index ``cut_at`` on."""
    images = [picture(size, 1 if i < cut_at else 2) for i in range(count)]
    return make_window(images, seq=seq, start_s=20.0 + seq)


def score_all(backend: ScoringBackend, requests: Sequence[ScoreRequest]) -> list[Score]:
    """``requests`` in calls of at most ``max_batch``."""
    step = backend.max_batch
    return [s for i in range(0, len(requests), step) for s in backend.score(requests[i : i + step])]


def check_score(score: Score, window: Window) -> None:
    assert isinstance(score, Score)
    assert score.significance is None or 1 <= score.significance <= 10
    assert isinstance(score.description, str)
    assert "\n" not in score.description
    assert isinstance(score.raw, str)
    assert isinstance(score.timings, StageTimings)
    stages = (score.timings.vision_s, score.timings.prefill_s, score.timings.generate_s)
    assert all(seconds >= 0 for seconds in stages)
    assert 0 <= score.best_frame < len(window.frames)


# --- conformance --------------------------------------------------------------------------------


def test_is_a_scoring_backend(backend: ScoringBackend, request: pytest.FixtureRequest) -> None:
    assert isinstance(backend, ScoringBackend)
    assert backend.name == request.node.callspec.params["backend"]
    assert isinstance(backend.model_id, str)
    assert backend.model_id
    assert isinstance(backend.max_batch, int)
    assert backend.max_batch >= 1


def test_input_size_is_positive_width_and_height(backend: ScoringBackend) -> None:
    width, height = backend.input_size
    assert isinstance(width, int)
    assert isinstance(height, int)
    assert width > 0
    assert height > 0
    if backend.name in SMOLVLM_IN_PROCESS:  # read from the checkpoint's image processor config
        assert backend.input_size == (IMAGE_SIZE, IMAGE_SIZE)


def test_scores_two_windows_in_order(backend: ScoringBackend) -> None:
    windows = [
        cut_window(backend.input_size, 1, 3, seq=2),
        cut_window(backend.input_size, 3, 4, seq=3),
    ]
    scores = score_all(backend, [ScoreRequest(window, PROMPT) for window in windows])
    assert len(scores) == 2
    for score, window in zip(scores, windows, strict=True):
        check_score(score, window)
    assert [score.best_frame for score in scores] == [1, 3]  # each window's own cut


@pytest.mark.parametrize("kind", ["static", "scene-cut"])
def test_static_and_scene_cut_windows_score(backend: ScoringBackend, kind: str) -> None:
    size = backend.input_size
    window = static_window(size) if kind == "static" else cut_window(size, 2, 4)
    (score,) = backend.score([ScoreRequest(window, PROMPT)])
    check_score(score, window)


@pytest.mark.parametrize("name", [param.values[0] for param in BACKENDS])
def test_describe_and_close(name: str, request: pytest.FixtureRequest) -> None:
    fresh = create_backend(model_config(name, request))
    fresh.load()
    line = fresh.describe()
    assert isinstance(line, str)
    assert line
    assert "\n" not in line
    fresh.close()
    assert isinstance(fresh.describe(), str)


# --- mlx-vlm only -------------------------------------------------------------------------------


def local_config(name: str, request: pytest.FixtureRequest) -> ModelConfig:
    """``model_config`` of an in-process backend."""
    config = model_config(name, request)
    assert isinstance(config, ModelConfig)
    return config


def mlx_backend(request: pytest.FixtureRequest, **kwargs: float) -> ScoringBackend:
    """A loaded ``MlxBackend``; skips without mlx-vlm or the tiny weights."""
    config = local_config("mlx", request)
    from streamd.scoring.mlx_impl import MlxBackend  # noqa: PLC0415 - needs mlx_vlm

    loaded = MlxBackend(config, **kwargs)
    loaded.load()
    return loaded


@pytest.fixture(scope="module")
def digit_backend(request: pytest.FixtureRequest) -> Iterator[ScoringBackend]:
    """Every score read from the digit logits: random weights give digits ~2% of the mass."""
    loaded = mlx_backend(request, min_digit_mass=0.0)
    yield loaded
    loaded.close()


def mlx_vlm_prompt(backend: ScoringBackend, window: Window) -> str:
    """Our prompt with one bare ``<image>`` a frame: what mlx-vlm's processor expands itself."""
    from streamd.scoring.mlx_impl import MlxBackend  # noqa: PLC0415 - needs mlx_vlm

    assert isinstance(backend, MlxBackend)
    text = render_video_prompt(
        PROMPT,
        [frame.pts_s - window.start_s for frame in window.frames],
        window.duration_s,
        image_seq_len=1,
        tokens=VideoTokens(fake_around_image="", global_image=""),
    )
    digits = backend.checkpoint.digits
    return text + (digits.lead if digits else "")


def test_mlx_prompt_matches_mlx_vlm_processing(
    digit_backend: ScoringBackend, tiny_checkpoint: Path
) -> None:
    """Our expanded prompt and pixels are what mlx-vlm's processor makes of one <image> a frame."""
    mlx_vlm = pytest.importorskip("mlx_vlm", reason=MLX_MISSING)
    from PIL import Image as PilImage  # noqa: PLC0415

    from streamd.scoring.mlx_impl import MlxBackend  # noqa: PLC0415 - needs mlx_vlm

    assert isinstance(digit_backend, MlxBackend)
    window = cut_window(digit_backend.input_size, 2, 3)
    ids = digit_backend.prompt_ids(ScoreRequest(window, PROMPT))
    checkpoint = digit_backend.checkpoint
    assert checkpoint.image_seq_len == IMAGE_SEQ_LEN
    assert ids.count(checkpoint.image_token_id) == len(window.frames) * IMAGE_SEQ_LEN

    _, processor = mlx_vlm.load(str(tiny_checkpoint))
    inputs = processor(
        text=mlx_vlm_prompt(digit_backend, window),
        images=[PilImage.fromarray(frame.image) for frame in window.frames],
        add_special_tokens=False,
    )
    assert np.asarray(inputs["input_ids"]).tolist() == [ids]
    np.testing.assert_array_equal(
        np.asarray(inputs["pixel_values"]), digit_backend.pixel_values(window)
    )


def test_mlx_first_token_matches_mlx_vlm_generate(
    digit_backend: ScoringBackend, tiny_checkpoint: Path
) -> None:
    """Our prefill picks the token ``mlx_vlm.generate`` picks from frames and a plain prompt."""
    mlx_vlm = pytest.importorskip("mlx_vlm", reason=MLX_MISSING)
    from PIL import Image as PilImage  # noqa: PLC0415

    from streamd.scoring.mlx_impl import MlxBackend  # noqa: PLC0415 - needs mlx_vlm

    assert isinstance(digit_backend, MlxBackend)
    window = cut_window(digit_backend.input_size, 1, 3)
    model, processor = mlx_vlm.load(str(tiny_checkpoint))
    result = mlx_vlm.generate(
        model,
        processor,
        mlx_vlm_prompt(digit_backend, window),
        image=[PilImage.fromarray(frame.image) for frame in window.frames],
        max_tokens=1,
        temperature=0.0,
    )
    logits = digit_backend.next_token_logits(ScoreRequest(window, PROMPT))
    assert result.prompt_tokens == len(digit_backend.prompt_ids(ScoreRequest(window, PROMPT)))
    assert result.token == int(np.argmax(logits))


def test_mlx_score_from_logits_and_describe_below(digit_backend: ScoringBackend) -> None:
    window = cut_window(digit_backend.input_size, 2, 4)
    (full,) = digit_backend.score([ScoreRequest(window, PROMPT)])
    assert full.significance is not None
    assert full.raw.startswith(f" {full.significance}{DESCRIPTION_PREFIX}")
    (short,) = digit_backend.score([ScoreRequest(window, PROMPT, describe_below=11)])
    assert short.significance == full.significance
    assert short.description == ""
    assert short.raw == f" {full.significance}"
    assert short.timings.generate_s <= full.timings.generate_s


def test_mlx_unparseable_answer_is_none(request: pytest.FixtureRequest) -> None:
    """Weights that only ever say "W" or "Z": free text without a number, so no score."""
    mx = pytest.importorskip("mlx.core", reason=MLX_MISSING)
    from streamd.scoring.mlx_impl import MlxBackend  # noqa: PLC0415 - needs mlx_vlm

    backend = mlx_backend(request)  # default min_digit_mass: digits get ~no probability here
    assert isinstance(backend, MlxBackend)
    checkpoint = backend.checkpoint
    language = checkpoint.model.language_model
    hidden = language.norm.weight.shape[0]
    norm = np.zeros(hidden, np.float32)
    norm[0] = 1.0  # the final hidden state is (s, 0, 0, ...): only its sign matters
    head = np.zeros(language.lm_head.weight.shape, np.float32)
    w_id, z_id = (checkpoint.tokenizer.convert_tokens_to_ids(t) for t in ("W", "Z"))
    head[w_id, 0], head[z_id, 0] = 1.0, -1.0
    language.norm.weight = mx.array(norm)
    language.lm_head.weight = mx.array(head)

    window = static_window(backend.input_size)
    (score,) = backend.score([ScoreRequest(window, PROMPT)])
    check_score(score, window)
    assert score.significance is None
    assert score.description
    assert set(score.description) <= {"W", "Z"}
    backend.close()


def test_mlx_loads_and_scores_on_a_model_thread(request: pytest.FixtureRequest) -> None:
    """As ModelRunner does: created on the loop's thread, loaded and called on its own."""
    backend = create_backend(model_config("mlx", request))
    window = cut_window((IMAGE_SIZE, IMAGE_SIZE), 1, 2)

    def run() -> list[Score]:
        backend.load()
        backend.warm_up()
        return backend.score([ScoreRequest(window, PROMPT)])

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamd-model") as pool:
        (score,) = pool.submit(run).result(timeout=60)
        pool.submit(backend.close).result(timeout=60)
    check_score(score, window)


def test_mlx_load_errors_are_one_line(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    config = local_config("mlx", request)
    from streamd.scoring.mlx_impl import MlxBackend  # noqa: PLC0415 - needs mlx_vlm

    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llava"}')
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(empty): "has no config.json",
        str(other): "is a 'llava' checkpoint, not SmolVLM2",
    }
    for model_id, expected in cases.items():
        backend = MlxBackend(config.model_copy(update={"id": model_id}))
        started = time.perf_counter()
        with pytest.raises(ModelError, match=expected) as raised:
            backend.load()
        assert time.perf_counter() - started < 1.0
        assert model_id in str(raised.value)
        assert "\n" not in str(raised.value)
    with pytest.raises(ModelError, match="not loaded"):
        MlxBackend(config).score([ScoreRequest(static_window((8, 8)), PROMPT)])
