"""``streamd bench``: the numbers it reports, from real backends and from hand-made timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamd import bench, cli
from streamd.config import StreamDefaults
from streamd.domain import Score, StageTimings
from streamd.errors import ExitCode
from streamd.hardware import parse_cpuinfo
from streamd.scoring.motion_impl import MotionBackend

KEYS = {
    "backend",
    "model",
    "window_s",
    "stride_s",
    "sample_fps",
    "windows",
    "load_s",
    "vision_s_per_frame",
    "prefill_s",
    "window_s_described",
    "window_s_quiet",
    "decode_tokens_per_s",
    "streams_described",
    "streams_quiet",
    "cpu",
}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert cli.main(["bench", *args, "--json"]) == ExitCode.OK
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    assert set(result) == KEYS
    return result


def test_windows_overlap_as_a_live_stream_cuts_them() -> None:
    stream = StreamDefaults(window_s=8, stride_s=4, sample_fps=1)
    windows = bench._windows("cam", stream, MotionBackend(), 3)
    assert [len(w.frames) for w in windows] == [8, 8, 8]
    assert [w.start_s for w in windows] == [0.0, 4.0, 8.0]
    # Each window shares all but stride_s x sample_fps frames with the one before.
    assert [f.index for f in windows[1].frames][:4] == [f.index for f in windows[0].frames][4:]
    assert windows[2].frames[-1].index == 15


def score(vision_s: float, misses: int, prefill_s: float, generate_s: float, tokens: int) -> Score:
    timings = StageTimings(vision_s, prefill_s, generate_s, 0, misses, completion_tokens=tokens)
    return Score(5, "", "", timings)


def test_summary_uses_the_steady_state_windows() -> None:
    stream = StreamDefaults(window_s=8, stride_s=4, sample_fps=1)
    first = (score(8.0, 8, 1.0, 2.0, 20), 11.0)  # a whole window of vision: left out
    described = [first, *[(score(2.0, 4, 1.0, 2.0, 40), 5.0)] * 3]
    quiet = [first, *[(score(2.0, 4, 1.0, 0.0, 0), 3.0)] * 3]
    result = bench._summarise(MotionBackend(), stream, 0.5, described, quiet)
    assert result.vision_s_per_frame == pytest.approx(0.5)  # 2 s for 4 new frames
    assert result.prefill_s == pytest.approx(1.0)
    assert result.decode_tokens_per_s == pytest.approx(20.0)  # 40 tokens in 2 s
    assert (result.window_s_described, result.window_s_quiet) == (5.0, 3.0)
    assert result.streams_described == pytest.approx(4 / 5)  # a window every 4 s, 5 s each
    assert result.streams_quiet == pytest.approx(4 / 3)


def test_motion_backend_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "--backend", "motion", "--windows", "3")
    assert result["backend"] == "motion"
    assert result["windows"] == 3
    assert (result["window_s"], result["stride_s"], result["sample_fps"]) == (8.0, 4.0, 1.0)
    assert result["decode_tokens_per_s"] is None  # the motion backend writes no text
    cpu = result["cpu"]
    assert isinstance(cpu, str)
    assert "usable cores; avx2=" in cpu  # every number comes with the CPU it was measured on


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\nprocessor\t: 1\n"
    )
    cpu = parse_cpuinfo(text, usable_cores=2)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.summary() == (
        "Intel(R) Xeon(R) Platinum 8480+, 2 usable cores; avx2=yes avx512f=yes"
        " avx512_vnni=no avx512_bf16=no amx_tile=yes amx_bf16=yes amx_int8=no"
    )
    assert parse_cpuinfo("", 1).flags == frozenset()


def test_tiny_smolvlm_reports_every_stage(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    result = run_json(
        capsys,
        "--backend",
        "transformers",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "8",
        "--window-s",
        "4",
        "--stride-s",
        "2",
        "--windows",
        "3",
    )
    assert result["model"] == str(tiny_model_dir)
    for key in ("vision_s_per_frame", "prefill_s", "window_s_described", "streams_quiet"):
        value = result[key]
        assert isinstance(value, float)
        assert value > 0
    tokens_per_s = result["decode_tokens_per_s"]
    assert isinstance(tokens_per_s, float)
    assert tokens_per_s > 0  # random weights always say something


def test_settings_come_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {backend: motion}\n"
        "defaults: {window_s: 6, stride_s: 3, sample_fps: 2}\n"
        "streams: [{name: a, url: rtsp://h/a}]\n"
    )
    result = run_json(capsys, "-c", str(cfg), "--windows", "2")
    assert (result["window_s"], result["stride_s"], result["sample_fps"]) == (6.0, 3.0, 2.0)
    result = run_json(capsys, "-c", str(cfg), "--windows", "2", "--stride-s", "1")
    assert result["stride_s"] == 1.0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--window-s", "2", "--stride-s", "3"], "--stride-s (3) must not exceed --window-s (2)"),
        (["--windows", "1"], "--windows: must be at least 2 (the first is not steady state)"),
        (["--backend", "openai", "--dtype", "float32"], "--dtype: does not apply"),
    ],
)
def test_bad_arguments_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert cli.main(["bench", "--backend", "motion", *args]) == ExitCode.USAGE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"streamd bench: {expected}")
