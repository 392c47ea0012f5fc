from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamd import cli
from streamd.config import (
    BACKEND_NAMES,
    DTYPES,
    MOTION_GATE_AUTO,
    PROFILES,
    Config,
    OpenAIModelConfig,
    StreamConfig,
    is_file_url,
    load_config,
    parse_config,
    summarize,
)
from streamd.errors import ConfigError, ExitCode
from streamd.scoring import prompt

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"streams": [{"name": "frontdoor", "url": "rtsp://cam.local:554/stream1"}]}


def problems_of(raw: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ or {})
    return caught.value.problems


def with_stream(**keys: object) -> dict[str, object]:
    return {"streams": [{"name": "cam", "url": "rtsp://h/s", **keys}]}


def test_minimal_gets_every_default() -> None:
    config = parse_config(MINIMAL, {})
    stream = config.streams[0]
    assert config.model.id == "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
    assert config.model.backend == "auto"
    assert config.mqtt.port == 1883
    assert config.mqtt.topic_prefix == "streamd"
    assert config.mqtt.outbox_size == 10000
    assert config.http.address == ("127.0.0.1", 9108)
    assert (stream.sample_fps, stream.window_s, stream.stride_s) == (1.0, 8.0, 4.0)
    assert stream.profile == "surveillance"
    assert stream.min_significance == 6
    assert stream.is_live


@pytest.mark.parametrize("path", ["config/minimal.yaml", "config/streamd.example.yaml"])
def test_shipped_examples_are_valid(path: str) -> None:
    config = load_config(REPO / path, environ={})
    assert config.streams


def test_example_documents_every_key() -> None:
    text = (REPO / "config/streamd.example.yaml").read_text()
    documented = yaml.safe_load(text)
    for section, model in (("model", "ModelConfig"), ("mqtt", "MqttConfig")):
        fields = set(getattr(__import__("streamd.config", fromlist=[model]), model).model_fields)
        assert fields - {"password_file"} <= set(documented[section]), section
    assert "password_file" in text
    assert set(StreamConfig.model_fields) - {"name", "url", "live", "realtime"} <= set(
        documented["defaults"]
    )
    assert {"name", "url", "live", "realtime"} <= set(documented["streams"][0])
    assert "shutdown_timeout_s" in documented


def test_stream_overrides_defaults() -> None:
    raw = {
        "defaults": {"window_s": 10, "stride_s": 5, "profile": "sports"},
        "streams": [
            {"name": "a", "url": "rtsp://h/a"},
            {"name": "b", "url": "rtsp://h/b", "window_s": 20, "profile": "scene"},
        ],
    }
    a, b = parse_config(raw, {}).streams
    assert (a.window_s, a.stride_s, a.profile) == (10, 5, "sports")
    assert (b.window_s, b.stride_s, b.profile) == (20, 5, "scene")


def test_env_substitution() -> None:
    raw = with_stream(url="rtsp://u:${CAM_PASS}@h/s")
    config = parse_config(raw, {"CAM_PASS": "s3cret"})
    assert config.streams[0].url == "rtsp://u:s3cret@h/s"
    assert "s3cret" not in summarize(config)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"streams": [{"name": "cam", "url": "x"}], "bogus": 1}, "bogus: unknown key"),
        ({"model": {"colour": "red"}, **MINIMAL}, "model.colour: unknown key"),
        ({"mqtt": {"hots": "x"}, **MINIMAL}, "mqtt.hots: unknown key"),
        ({"defaults": {"windows_s": 3}, **MINIMAL}, "defaults.windows_s: unknown key"),
        (with_stream(fps=3), "streams[0].fps: unknown key"),
        ({}, "streams: field required"),
        ({"streams": []}, "streams: must list at least one stream"),
        ({"streams": {"a": 1}}, "streams: must be a list, not a mapping"),
        ({"streams": ["rtsp://x"]}, "streams[0]: must be a mapping, not str"),
        ({"streams": [{"name": "cam"}]}, "streams[0].url: field required"),
        ({"streams": [{"url": "x"}]}, "streams[0].name: field required"),
        (with_stream(name="Front Door"), "streams[0].name: must match [a-z0-9_-]+"),
        (with_stream(window_s=2, stride_s=3), "streams[0]: stride_s (3) must not exceed window_s"),
        (with_stream(sample_fps=0), "streams[0].sample_fps: input should be greater than 0"),
        (with_stream(sample_fps=0.1, window_s=5, stride_s=5), "holds no frame"),
        (with_stream(min_significance=11), "streams[0].min_significance: input should be less"),
        (with_stream(profile="nature"), "streams[0].profile: input should be 'highlights'"),
        (with_stream(motion_gate=2), "streams[0].motion_gate: input should be less than or equal"),
        ({"defaults": {"window_s": 1, "stride_s": 2}, **MINIMAL}, "defaults: stride_s (2)"),
        ({"model": {"device": "gpu"}, **MINIMAL}, "model.device: must be auto, cpu, mps, cuda"),
        ({"model": {"dtype": "int4"}, **MINIMAL}, "model.dtype: input should be 'auto'"),
        (
            {"model": {"backend": "onnx"}, **MINIMAL},
            "model.backend: must be one of auto, transformers, mlx, motion, openai, not 'onnx'",
        ),
        ({"model": {"max_new_tokens": 0}, **MINIMAL}, "model.max_new_tokens: input should be"),
        ({"mqtt": {"port": 99999}, **MINIMAL}, "mqtt.port: input should be less than or equal"),
        ({"mqtt": {"password": "x"}, **MINIMAL}, "mqtt: a password needs a username"),
        (
            {"mqtt": {"username": "u", "password": "x", "password_file": "/f"}, **MINIMAL},
            "mqtt: set password or password_file, not both",
        ),
        ({"mqtt": {"tls": {"certfile": "/c"}}, **MINIMAL}, "mqtt.tls: certfile and keyfile go"),
        ({"mqtt": {"topic_prefix": "a/#"}, **MINIMAL}, "mqtt.topic_prefix: string should match"),
        ({"metrics": {"listen": "9108"}, **MINIMAL}, "metrics.listen: must be host:port"),
        ({"metrics": {"listen": "h:70000"}, **MINIMAL}, "metrics.listen: port 70000 out of range"),
        (with_stream(realtime=True), "streams[0]: realtime: only applies to files"),
        ({"shutdown_timeout_s": 0, **MINIMAL}, "shutdown_timeout_s: input should be greater"),
        ([1, 2], "<root>: must be a mapping, not a list"),
    ],
)
def test_every_rule_has_a_failing_case(raw: object, expected: str) -> None:
    problems = problems_of(raw)
    assert any(p.startswith(expected) or expected in p for p in problems), problems


def test_unset_variable_is_named() -> None:
    problems = problems_of(with_stream(url="rtsp://u:${NOPE_VAR}@h/s"))
    assert problems == ["streams[0].url: environment variable NOPE_VAR is not set"]


def test_duplicate_names() -> None:
    raw = {
        "streams": [{"name": "a", "url": "x"}, {"name": "b", "url": "y"}, {"name": "a", "url": "z"}]
    }
    assert problems_of(raw) == ["streams: duplicate stream name 'a' (streams[0] and streams[2])"]


def test_all_problems_reported_at_once() -> None:
    raw = {"foo": 1, "mqtt": {"port": 0}, "streams": [{"name": "A"}, {"name": "b", "url": "x"}]}
    problems = problems_of(raw)
    assert len(problems) == 4, problems
    assert all(": " in p for p in problems)


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-pass"
    secret.write_text("hunter2\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "mqtt: {username: alice, password_file: mqtt-pass}\nstreams: [{name: a, url: rtsp://h/a}]\n"
    )
    config = load_config(cfg, environ={})
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config)


def test_password_file_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mqtt: {username: a, password_file: /nope/x}\nstreams: [{name: a, url: x}]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(cfg, environ={})
    assert caught.value.problems == [
        "mqtt.password_file: cannot read /nope/x: No such file or directory"
    ]


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert caught.value.problems[0].startswith(f"{bad}:2:1: invalid YAML")


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, {})
    with pytest.raises(ValueError, match="frozen"):
        config.streams[0].window_s = 3  # type: ignore[misc]
    assert isinstance(config, Config)


def test_listen_variants() -> None:
    ipv6 = parse_config({"metrics": {"listen": "[::1]:9000"}, **MINIMAL}, {})
    assert ipv6.http.address == ("::1", 9000)
    off = parse_config({"metrics": {"listen": ""}, **MINIMAL}, {})
    assert off.http.address is None


@pytest.mark.parametrize(
    ("url", "is_file"),
    [
        ("/srv/match.mp4", True),
        ("match.mp4", True),
        ("file:///srv/match.mp4", True),
        ("rtsp://h/s", False),
        ("rtsps://h/s", False),
        ("https://h/live.m3u8", False),
        ("/dev/video0", False),
    ],
)
def test_live_auto(url: str, is_file: bool) -> None:
    stream = parse_config({"streams": [{"name": "a", "url": url}]}, {}).streams[0]
    assert is_file_url(url) is is_file
    assert stream.is_live is not is_file


def test_live_explicit_on_a_file_loops_it() -> None:
    stream = parse_config({"streams": [{"name": "a", "url": "/x.mp4", "live": True}]}, {}).streams[
        0
    ]
    assert stream.is_live


def test_model_section_is_chosen_by_backend() -> None:
    config = parse_config(
        {"model": {"backend": "openai", "base_url": "http://gpu:8000/v1"}, **MINIMAL}, {}
    )
    assert isinstance(config.model, OpenAIModelConfig)
    assert config.model.max_in_flight == 8
    assert parse_config(MINIMAL, {}).model.backend == "auto"
    # Each backend's own keys: device is not a remote server's, base_url not a local model's.
    assert problems_of({"model": {"backend": "openai", "device": "cpu"}, **MINIMAL}) == [
        "model.device: unknown key"
    ]
    assert problems_of({"model": {"backend": "motion", "base_url": "http://x/v1"}, **MINIMAL}) == [
        "model.base_url: unknown key"
    ]
    assert problems_of({"model": {"backend": "openai", "base_url": "ftp://x"}, **MINIMAL}) == [
        "model.base_url: must be an http:// or https:// URL, not 'ftp://x'"
    ]


def test_check_config_never_shows_the_api_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path,
        "model: {backend: openai, base_url: 'http://gpu:8000/v1', api_key: sk-SECRET123}\n"
        "streams: [{name: a, url: rtsp://h/a}]\n",
    )
    assert cli.main(["check-config", str(cfg)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "backend openai at http://gpu:8000/v1" in out
    assert "SECRET123" not in out


def test_every_section_reported_at_once() -> None:
    # shutdown_timeout_s used to be checked only once everything else was valid.
    raw = {"shutdown_timeout_s": 0, "model": {"dtype": "int4"}, "streams": [{"name": "a"}]}
    problems = problems_of(raw)
    assert [p.split(":")[0] for p in problems] == [
        "model.dtype",
        "streams[0].url",
        "shutdown_timeout_s",
    ], problems


def test_empty_sections_mean_defaults() -> None:
    config = parse_config({"model": None, "mqtt": None, "defaults": None, **MINIMAL}, {})
    assert config.mqtt.port == 1883
    assert config.streams[0].window_s == 8.0


def test_invalid_defaults_are_reported_once() -> None:
    raw = {"defaults": {"window_s": -1}, "streams": [{"name": "a", "url": "x"}] * 1}
    assert problems_of(raw) == ["defaults.window_s: input should be greater than 0"]


@pytest.mark.parametrize(
    ("url", "environ", "expected"),
    [
        ("rtsp://u:${P:-guest}@h/s", {}, "rtsp://u:guest@h/s"),
        ("rtsp://u:${P:-guest}@h/s", {"P": ""}, "rtsp://u:guest@h/s"),
        ("rtsp://u:${P:-guest}@h/s", {"P": "pw"}, "rtsp://u:pw@h/s"),
        ("rtsp://u:${P:-}@h/s", {}, "rtsp://u:@h/s"),
        ("rtsp://u:pa$$word@h/s", {}, "rtsp://u:pa$word@h/s"),
        ("rtsp://u:$${P}@h/s", {"P": "x"}, "rtsp://u:${P}@h/s"),
        ("rtsp://h/s?a=$1", {}, "rtsp://h/s?a=$1"),
    ],
)
def test_env_default_and_escape(url: str, environ: dict[str, str], expected: str) -> None:
    assert parse_config(with_stream(url=url), environ).streams[0].url == expected


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 5000])
def test_window_bounds_without_traceback(value: float) -> None:
    problems = problems_of(with_stream(window_s=value))
    assert len(problems) == 1
    assert problems[0].startswith("streams[0].window_s: ")


def test_frames_per_window_are_bounded() -> None:
    problems = problems_of({"defaults": {"window_s": 3600, "sample_fps": 120}, **MINIMAL})
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith("defaults: window_s (3600) x sample_fps (120) = 432000 frames")
    assert "over the limit of 256" in problem
    assert "340 GB" in problem  # 432000 frames of 512x512 RGB


def write_config(tmp_path: Path, text: str) -> Path:
    cfg_dir = tmp_path / "etc"
    cfg_dir.mkdir(exist_ok=True)
    cfg = cfg_dir / "streamd.yaml"
    cfg.write_text(text)
    return cfg


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(
        tmp_path,
        "mqtt: {username: u, password_file: secrets/mqtt, tls: {ca_certs: ca.pem}}\n"
        "streams: [{name: a, url: videos/a.mp4}, {name: b, url: rtsp://h/b},"
        " {name: c, url: /abs/c.mp4}]\n",
    )
    (cfg.parent / "secrets").mkdir()
    (cfg.parent / "secrets/mqtt").write_text("pw\n")
    (cfg.parent / "ca.pem").write_text("not checked here\n")
    monkeypatch.chdir(tmp_path)  # somewhere else: the current directory must not matter
    config = load_config(Path("etc/streamd.yaml"), environ={})
    a, b, c = config.streams
    assert a.url == str(cfg.parent.resolve() / "videos/a.mp4")
    assert (b.url, c.url) == ("rtsp://h/b", "/abs/c.mp4")
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "pw"
    assert config.mqtt.tls is not None
    assert config.mqtt.tls.ca_certs == cfg.parent.resolve() / "ca.pem"


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        "mqtt: {tls: {ca_certs: /nope/ca.pem, certfile: c.pem, keyfile: /nope/k.pem}}\n"
        "streams: [{name: a, url: rtsp://h/a}]\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(cfg, environ={})
    assert caught.value.problems == [
        "mqtt.tls.ca_certs: cannot read /nope/ca.pem: No such file or directory",
        f"mqtt.tls.certfile: cannot read {cfg.parent.resolve()}/c.pem: No such file or directory",
        "mqtt.tls.keyfile: cannot read /nope/k.pem: No such file or directory",
    ]


def test_check_config_exits_78_naming_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path,
        "mqtt: {username: u, password_file: gone, tls: {ca_certs: /nope/ca.pem}}\n"
        "streams: [{name: a, url: rtsp://h/a}]\n",
    )
    assert cli.main(["check-config", str(cfg)]) == ExitCode.CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "mqtt.tls.ca_certs: cannot read /nope/ca.pem: No such file or directory",
        f"mqtt.password_file: cannot read {cfg.parent.resolve()}/gone: No such file or directory",
    ]


def test_shipped_example_passes_check_config_as_shipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FRONTDOOR_PASSWORD", raising=False)
    assert cli.main(["check-config", str(REPO / "config/streamd.example.yaml")]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "frontdoor" in out
    assert "match" in out


def test_choice_lists_are_defined_once() -> None:
    parser = cli.build_parser()
    analyze = next(
        action.choices["analyze"]
        for action in parser._actions
        if isinstance(action.choices, dict) and "analyze" in action.choices
    )
    choices = {a.dest: tuple(a.choices) for a in analyze._actions if a.choices}
    assert choices["profile"] == PROFILES
    assert choices["dtype"] == DTYPES
    assert set(choices["backend"]) == set(BACKEND_NAMES)
    assert set(prompt.PROFILES) == set(PROFILES)


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), (True, True), (False, False), ("false", False)]
)
def test_describe_below_min_is_auto_true_or_false(value: object, expected: object) -> None:
    config = parse_config(with_stream(describe_below_min=value), {})
    assert config.streams[0].describe_below_min == expected
    assert parse_config(with_stream(), {}).streams[0].describe_below_min == "auto"
    (problem,) = problems_of(with_stream(describe_below_min="sometimes"))
    assert problem.startswith("streams[0].describe_below_min:"), problem


GATE = MOTION_GATE_AUTO["surveillance"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_stream(), GATE),  # the default profile, motion_gate auto
        (with_stream(motion_gate="auto"), GATE),
        (with_stream(motion_gate=" AUTO "), GATE),
        (with_stream(profile="sports"), 0.0),  # auto: off for every other profile
        (with_stream(profile="scene", motion_gate="auto"), 0.0),
        (with_stream(motion_gate=0), 0.0),  # explicit numbers as before: 0 is off
        (with_stream(motion_gate=0.01), 0.01),
        (with_stream(profile="sports", motion_gate=0.02), 0.02),
        (with_stream(motion_gate="0.05"), 0.05),
        (with_stream(motion_gate=1), 1.0),
        # auto is resolved per stream, from the stream's own profile
        ({"defaults": {"profile": "sports"}, **with_stream(profile="surveillance")}, GATE),
        ({"defaults": {"motion_gate": "auto"}, **with_stream(profile="technical")}, 0.0),
        ({"defaults": {"motion_gate": 0.1}, **with_stream(profile="highlights")}, 0.1),
        ({"defaults": {"motion_gate": 0}, **with_stream()}, 0.0),
    ],
)
def test_motion_gate_auto_is_the_profiles_gate(raw: dict[str, object], expected: float) -> None:
    gate = parse_config(raw, {}).streams[0].motion_gate
    assert isinstance(gate, float)
    assert gate == expected


def test_motion_gate_defaults_per_profile() -> None:
    assert set(MOTION_GATE_AUTO) <= set(PROFILES)
    assert 0 < GATE < 0.001  # two cells of the 64x64 grid pass it (bench/motion_gate.py)
    gates = {p: parse_config(with_stream(profile=p), {}).streams[0].motion_gate for p in PROFILES}
    assert gates == {p: GATE if p == "surveillance" else 0.0 for p in PROFILES}
    assert (
        parse_config({"defaults": {"profile": "sports"}, **MINIMAL}, {}).defaults.motion_gate == 0
    )


@pytest.mark.parametrize("value", ["fast", "", True, False, None, [0.1], {"auto": 1}])
def test_motion_gate_rejects_other_values_in_one_line(value: object) -> None:
    assert problems_of(with_stream(motion_gate=value)) == [
        f"streams[0].motion_gate: must be a number from 0 to 1 (0 = off) or auto, not {value!r}"
    ]


def test_motion_gate_of_an_unknown_profile_adds_no_second_problem() -> None:
    (problem,) = problems_of(with_stream(profile="nature"))
    assert problem.startswith("streams[0].profile:"), problem


def test_summary_names_each_streams_motion_gate() -> None:
    raw = {
        "streams": [
            {"name": "yard", "url": "rtsp://h/a"},
            {"name": "match", "url": "rtsp://h/b", "profile": "sports"},
            {"name": "door", "url": "rtsp://h/c", "motion_gate": 0.01},
        ]
    }
    lines = summarize(parse_config(raw, {})).splitlines()
    assert lines[-3].endswith(f"motion gate {GATE:g} (profile default))")
    assert lines[-2].endswith("motion gate off)")
    assert lines[-1].endswith("motion gate 0.01)")
