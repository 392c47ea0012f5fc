"""model.vision_quantize: int8 on the tiny random SmolVLM2: loads, scores, stays close to fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamd.cli import main
from streamd.config import ModelConfig, parse_config
from streamd.domain import Frame, ScoreRequest, Window
from streamd.errors import ConfigError, ExitCode, ModelError
from streamd.scoring.prompt import PROFILES
from streamd.scoring.transformers_impl import TransformersBackend
from streamd.scoring.vision_quantize import quantize_linears
from tests.media import ClipSet
from tests.tiny_smolvlm import IMAGE_SIZE, tiny_model_dir

__all__ = ["tiny_model_dir"]

MINIMAL = {"streams": [{"name": "frontdoor", "url": "rtsp://cam.local:554/stream1"}]}
DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


def load(directory: Path, mode: str, dtype: str = "float32") -> TransformersBackend:
    config = ModelConfig(
        id=str(directory), device="cpu", dtype=dtype, max_new_tokens=8, vision_quantize=mode
    )
    backend = TransformersBackend(config, min_digit_mass=0.0)
    backend.load()
    return backend


def scene(index: int) -> Frame:
    """Smooth gradients with a moving square: closer to video than noise."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    image = np.stack([xs * 4, ys * 4, (xs + ys) * 2], axis=-1).astype(np.uint8)
    image[10:30, 5 + 4 * index : 25 + 4 * index] = (240, 30, 30)
    return Frame("cam", index, float(index), 1_700_000_000.0 + index, image)


def window(count: int = 4) -> Window:
    return Window("cam", 1, 0.0, float(count), tuple(scene(i) for i in range(count)), 0.0)


def test_int8_quantizes_the_vision_linears_and_scores(tiny_model_dir: Path) -> None:
    backend = load(tiny_model_dir, "int8")
    try:
        inner = backend.checkpoint.model.model
        vision = list(inner.vision_model.modules()) + list(inner.connector.modules())
        assert not any(type(m) is torch.nn.Linear for m in vision)
        assert sum(isinstance(m, DynamicLinear) for m in vision) > 0
        text = inner.text_model.modules()
        assert not any(isinstance(m, DynamicLinear) for m in text)
        (score,) = backend.score([ScoreRequest(window(), PROFILES["surveillance"])])
        assert score.significance in range(1, 11)
        assert score.timings.vision_misses == 4
    finally:
        backend.close()


def test_int8_features_stay_close_to_fp32(tiny_model_dir: Path) -> None:
    plain, quantized = load(tiny_model_dir, "none"), load(tiny_model_dir, "int8")
    try:
        with torch.inference_mode():
            (reference,) = plain.frame_encoder.encode([window()]).features
            (features,) = quantized.frame_encoder.encode([window()]).features
        assert features.shape == reference.shape
        cosine = torch.nn.functional.cosine_similarity(features, reference, dim=-1)
        assert float(cosine.min()) > 0.99
        assert not torch.equal(features, reference)  # it did change something
    finally:
        plain.close()
        quantized.close()


def test_none_changes_nothing(tiny_model_dir: Path) -> None:
    backend = load(tiny_model_dir, "none")
    try:
        modules = backend.checkpoint.model.modules()
        assert not any(isinstance(m, DynamicLinear) for m in modules)
    finally:
        backend.close()


def test_quantize_linears_counts_what_it_replaced() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
        assert quantize_linears(model, per_channel=False) == 2
        assert all(isinstance(model[i], DynamicLinear) for i in (0, 2))
        close = torch.nn.functional.cosine_similarity(model(x), expected, dim=-1)
    assert float(close.min()) > 0.99


def test_int8_needs_float32(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError) as caught:
        load(tiny_model_dir, "int8", dtype="bfloat16")
    message = str(caught.value)
    assert "\n" not in message
    assert "model.dtype to float32" in message
    assert "bfloat16" in message


def test_a_bad_value_is_one_config_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"model": {"vision_quantize": "int4"}, **MINIMAL}, {})
    (problem,) = caught.value.problems
    assert problem.startswith("model.vision_quantize: input should be 'none' or 'int8'")
    assert "\n" not in problem


def test_analyze_takes_the_flag(
    tiny_model_dir: Path, clips: ClipSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "highlights.json"
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    flag = ["--vision-quantize", "int8"]
    code = main(["analyze", str(clips.activity.path), *model, *flag, "--json", str(out)])
    assert code == ExitCode.OK, capsys.readouterr().err
    assert json.loads(out.read_text())["complete"] is True
    with pytest.raises(SystemExit):
        main(["analyze", str(clips.activity.path), "--vision-quantize", "int4"])
    assert "--vision-quantize: invalid choice: 'int4'" in capsys.readouterr().err
