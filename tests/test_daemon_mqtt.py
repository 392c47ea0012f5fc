"""The whole product: the daemon as a real process, a real broker, real video, real RTSP."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.broker import Mosquitto, free_port
from tests.conftest import RtspServerFactory
from tests.daemon_proc import DaemonProcess, write_config
from tests.media import ClipSet, Segment, write_clip
from tests.mqtt_tools import Gate, Subscriber, retained
from tests.scrape import get, metric
from tests.waiting import eventually_sync

pytestmark = pytest.mark.slow

EVENT_KEYS = {
    "v",
    "type",
    "id",
    "stream",
    "seq",
    "start",
    "end",
    "start_pts_s",
    "end_pts_s",
    "significance",
    "peak_significance",
    "description",
    "profile",
    "model",
    "windows",
    "clip",  # v1.1: null without storage.dir
    "snapshot",
}
ANALYSIS_KEYS = {"v", "stream", "seq", "start", "end", "significance", "description", "latency_s"}
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEST_TIMEOUT_S = 60


def config(
    url: str, prefix: str, port: int, metrics_port: int = 0, **overrides: object
) -> dict[str, object]:
    stream = {"name": "cam", "url": url, **overrides.pop("stream", {})}  # type: ignore[dict-item]
    mqtt = {
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "client_id": f"streamd-{prefix.rsplit('/', 1)[-1]}",
        "keepalive_s": 5,
        "discovery_prefix": f"{prefix}/ha",
        **overrides.pop("mqtt", {}),  # type: ignore[dict-item]
    }
    return {
        "model": {"backend": "motion"},
        "mqtt": mqtt,
        "metrics": {"listen": f"127.0.0.1:{metrics_port or free_port()}"},
        "shutdown_timeout_s": 5,
        "defaults": {
            "window_s": 2,
            "stride_s": 1,
            "min_significance": 5,
            "cooldown_s": 0,
            "motion_gate": 0,  # every window analysed: the gate has tests of its own
        },
        "streams": [stream],
        **overrides,
    }


def payloads(sub: Subscriber, topic: str) -> list[dict[str, object]]:
    return [json.loads(bytes(m.payload)) for m in sub.on(topic)]


@pytest.fixture(scope="module")
def blinking_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quiet 4 s, moving bars 1 s: looped as a live camera, an event (new, update, end) every 5 s.

    With 2 s windows every 1 s, the event needs two quiet windows after the bars to end.
    """
    path = tmp_path_factory.mktemp("blink") / "blink.mp4"
    write_clip(path, [Segment(4, "black"), Segment(1, "bars")], fps=10)
    return path


async def wait_line(daemon: DaemonProcess, pattern: str, within_s: float = 20) -> str:
    return await asyncio.to_thread(daemon.wait_for_line, pattern, within_s)


async def test_events_over_mqtt_follow_the_spec(
    mosquitto: Mosquitto,
    clips: ClipSet,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", config(str(clips.activity.path), unique_topic, mosquitto.port)
    )
    async with asyncio.timeout(TEST_TIMEOUT_S), Subscriber(mosquitto, f"{unique_topic}/#") as sub:
        daemon = DaemonProcess(cfg)
        daemons.append(daemon)
        assert await asyncio.to_thread(daemon.wait, 30) == 0  # the file ended: clean stop
        # The goodbye is the daemon's last message: everything before it has arrived too.
        await sub.until(lambda: _last(sub, f"{unique_topic}/available") == b"offline")
        events = payloads(sub, f"{unique_topic}/cam/events")
        late = await retained(mosquitto, f"{unique_topic}/#")
    # Events: the spec's schema, one event, new ... end, seq gap-free from 1.
    assert events, daemon.output
    for event in events:
        assert set(event) == EVENT_KEYS
        assert event["v"] == 1
        assert event["stream"] == "cam"
        assert event["model"] == "motion"
        assert event["clip"] is None  # no storage.dir: no files
        assert event["snapshot"] is None
        assert event["profile"] == "surveillance"
        assert ISO_RE.match(str(event["start"]))
        assert ISO_RE.match(str(event["end"]))
        assert 1 <= int(event["significance"]) <= int(event["peak_significance"]) <= 10  # type: ignore[call-overload]
    assert events[0]["type"] == "new"
    assert events[-1]["type"] == "end"
    assert {e["type"] for e in events[1:-1]} <= {"update"}
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["id"] for e in events}) == 1
    assert events[0]["start_pts_s"] == 5.0  # the first window that sees the bars (6-10 s)
    # The bars span 6-10 s; with 2 s windows every 1 s the event covers 5-11 s.
    assert events[-1]["end_pts_s"] == 11.0
    # Per-window analysis, QoS 0: 16 s at 1 fps, 2 s windows every 1 s. Every one of them,
    # those scored before the first CONNACK too: held while the first connection is made.
    analysis = payloads(sub, f"{unique_topic}/cam/analysis")
    assert [a["seq"] for a in analysis] == list(range(1, 16)), daemon.output
    assert all(set(a) == ANALYSIS_KEYS for a in analysis)
    # Retained state a late subscriber gets.
    assert late[f"{unique_topic}/available"] == b"offline"
    assert late[f"{unique_topic}/cam/status"] == b"offline"
    assert late[f"{unique_topic}/cam/snapshot"].startswith(b"\xff\xd8")  # a JPEG
    availability = [bytes(m.payload) for m in sub.on(f"{unique_topic}/available")]
    assert availability[0] == b"online"
    assert availability[-1] == b"offline"
    # Home Assistant discovery points at our topics.
    discovery = {t: json.loads(p) for t, p in late.items() if t.startswith(f"{unique_topic}/ha/")}
    assert {t.split("/")[-4] for t in discovery} >= {"sensor", "binary_sensor", "camera"}
    for payload in discovery.values():
        assert payload["availability_topic"] == f"{unique_topic}/available"
        topic = payload.get("state_topic") or payload.get("topic")
        assert str(topic).startswith(f"{unique_topic}/cam/")
    # One log line when the event opens and one when it closes (updates are DEBUG).
    assert daemon.count(r"event (new|end) cam") == 2
    assert daemon.count(r"event update cam") == 0


async def test_first_windows_analysed_while_connecting_still_arrive(
    mosquitto: Mosquitto,
    clips: ClipSet,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    slow = Gate(mosquitto, delay_s=2.0)  # the first CONNACK comes 2 s late
    await slow.open()
    cfg = write_config(
        tmp_path / "c.yaml",
        config(str(clips.activity.path), unique_topic, slow.port, mqtt={"ha_discovery": False}),
    )
    analysis_topic = f"{unique_topic}/cam/analysis"
    try:
        async with (
            asyncio.timeout(TEST_TIMEOUT_S),
            Subscriber(mosquitto, f"{unique_topic}/#") as sub,
        ):
            daemon = DaemonProcess(cfg)
            daemons.append(daemon)
            assert await asyncio.to_thread(daemon.wait, 30) == 0
            await sub.until(lambda: _last(sub, f"{unique_topic}/available") == b"offline")
    finally:
        await slow.aclose()
    lines = daemon.lines
    connected = next(i for i, line in enumerate(lines) if "mqtt: connected" in line)
    analysed = [i for i, line in enumerate(lines) if re.search(r"window #\d+ .*significance", line)]
    assert analysed[0] < connected, daemon.output  # the case this test is about
    assert [a["seq"] for a in payloads(sub, analysis_topic)] == list(range(1, 16)), daemon.output
    assert next(e["seq"] for e in payloads(sub, f"{unique_topic}/cam/events")) == 1


async def test_broker_outage_loses_no_event(
    blinking_clip: Path, unique_topic: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    metrics_port = free_port()
    events_topic = f"{unique_topic}/cam/events"
    async with asyncio.timeout(TEST_TIMEOUT_S * 2):
        with Mosquitto() as broker:
            gate = Gate(broker)  # the daemon reaches the broker only through the gate
            await gate.open()
            cfg = write_config(
                tmp_path / "c.yaml",
                config(
                    str(blinking_clip),
                    unique_topic,
                    gate.port,
                    metrics_port,
                    stream={"live": True},
                    mqtt={"ha_discovery": False},
                ),
            )
            try:
                async with Subscriber(broker, events_topic) as before:
                    daemon = DaemonProcess(cfg)
                    daemons.append(daemon)
                    await before.until(lambda: len(before.messages) >= 2, within=30)
                    broker.kill()  # the broker dies; the daemon's connection goes with it
                    gate.shut()
                    logged_at_kill = daemon.count(r"event (new|end) cam")
                # Several seconds without a broker, while events keep happening.
                await wait_line(daemon, r"mqtt: .*(lost|disconnected|cannot connect)")
                await asyncio.to_thread(
                    lambda: _wait_count(daemon, r"event (new|end) cam", logged_at_kill + 3)
                )
                broker.start()  # same port
                async with Subscriber(broker, events_topic) as after:
                    await gate.open()
                    await asyncio.to_thread(_wait_count, daemon, r"mqtt: connected", 2)
                    # Reconnected: the held events drain while it runs; then a clean stop.
                    # The held events drain while it runs: the newest one arrives.
                    newest = re.findall(r"event (?:new|end) cam (\S+)", daemon.output)[-1]
                    await after.until(lambda: newest in _ids(after.messages), within=15)
                    daemon.signal(signal.SIGTERM)
                    assert await asyncio.to_thread(daemon.wait, 30) == 0
                    last = re.findall(r"event end cam (\S+)", daemon.output)[-1]
                    await after.until(lambda: last in _ids(after.messages), within=10)
            finally:
                await gate.aclose()
    messages = [json.loads(bytes(m.payload)) for m in [*before.messages, *after.messages]]
    first_seen = list(dict.fromkeys(int(m["seq"]) for m in messages))
    assert first_seen == list(range(1, len(first_seen) + 1))  # gap-free, in order; dups allowed
    # Every event the daemon opened or closed (its INFO log lines) reached the subscriber.
    logged_ids = re.findall(r"event (new|end) cam (\S+)", daemon.output)
    received = {(str(m["type"]), str(m["id"])) for m in messages}
    lost = [pair for pair in logged_ids if pair not in received]
    assert lost == [], f"lost {lost} of {len(logged_ids)}"
    assert len(logged_ids) >= logged_at_kill + 3


def _last(sub: Subscriber, topic: str) -> bytes | None:
    messages = sub.on(topic)
    return bytes(messages[-1].payload) if messages else None


def _ids(messages: list[aiomqtt.Message]) -> set[str]:
    return {str(json.loads(bytes(m.payload))["id"]) for m in messages}


def _wait_count(daemon: DaemonProcess, pattern: str, count: int) -> None:
    eventually_sync(lambda: daemon.count(pattern) >= count, 30, f"{count} x {pattern}")


@pytest.mark.rtsp
async def test_camera_outage_status_and_events_resume(
    mosquitto: Mosquitto,
    rtsp_server: RtspServerFactory,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    camera = rtsp_server(live=True, pattern="ball")
    cfg = write_config(
        tmp_path / "c.yaml",
        config(
            camera.url,
            unique_topic,
            mosquitto.port,
            mqtt={"ha_discovery": False},
            stream={"read_timeout_s": 2, "open_timeout_s": 2, "min_significance": 2},
        ),
    )
    status_topic = f"{unique_topic}/cam/status"
    analysis_topic = f"{unique_topic}/cam/analysis"
    async with asyncio.timeout(TEST_TIMEOUT_S), Subscriber(mosquitto, f"{unique_topic}/#") as sub:
        daemon = DaemonProcess(cfg)
        daemons.append(daemon)
        await sub.until(lambda: len(sub.on(analysis_topic)) >= 2, within=30)
        assert [bytes(m.payload) for m in sub.on(status_topic)][-1] == b"online"
        camera.kill()
        await sub.until(lambda: bytes(sub.on(status_topic)[-1].payload) == b"offline")
        before = len(sub.on(analysis_topic))
        camera.restart()
        await sub.until(lambda: bytes(sub.on(status_topic)[-1].payload) == b"online", within=30)
        await sub.until(lambda: len(sub.on(analysis_topic)) >= before + 2, within=30)
        events = payloads(sub, f"{unique_topic}/cam/events")
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 20) == 0
    assert events, "the moving ball opens an event"
    assert [bytes(m.payload) for m in sub.on(status_topic)].count(b"offline") >= 1
    assert daemon.count(r"stream cam lost") >= 1


async def test_sigterm_mid_event_sends_end_and_offline(
    mosquitto: Mosquitto,
    clips: ClipSet,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        config(
            str(clips.motion.path),
            unique_topic,
            mosquitto.port,
            stream={"live": True},
        ),
    )
    events_topic = f"{unique_topic}/cam/events"
    async with asyncio.timeout(TEST_TIMEOUT_S), Subscriber(mosquitto, f"{unique_topic}/#") as sub:
        daemon = DaemonProcess(cfg)
        daemons.append(daemon)
        await sub.until(lambda: len(sub.on(events_topic)) >= 1, within=30)
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 10) == 0
        await sub.until(
            lambda: bytes(sub.on(f"{unique_topic}/available")[-1].payload) == b"offline"
        )
        late = await retained(mosquitto, f"{unique_topic}/#")
    events = payloads(sub, events_topic)
    assert events[0]["type"] == "new"
    assert events[-1]["type"] == "end"
    assert events[-1]["id"] == events[0]["id"]
    # The end event, then the stream's offline status, arrived before the goodbye.
    order = [m.topic.value for m in sub.messages]
    available = f"{unique_topic}/available"
    last_end = max(i for i, m in enumerate(sub.messages) if m.topic.value == events_topic)
    assert order.index(available, last_end) > last_end
    status = f"{unique_topic}/cam/status"
    last_status = max(i for i, topic in enumerate(order) if topic == status)
    assert bytes(sub.messages[last_status].payload) == b"offline"
    assert order.index(available, last_status) > last_status
    assert late[status] == b"offline"


async def test_slow_model_drops_windows_keeps_lag_and_memory_bounded(
    record_property: Callable[[str, object], None],
    mosquitto: Mosquitto,
    clips: ClipSet,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    metrics_port = free_port()
    cfg = write_config(
        tmp_path / "c.yaml",
        config(
            str(clips.motion.path),
            unique_topic,
            mosquitto.port,
            metrics_port,
            stream={"live": True},
            mqtt={"ha_discovery": False},
        ),
    )
    delay_s = 2.5  # a window every 1 s, the model needs 2.5 s per window
    lags: list[float] = []
    rss: list[int] = []
    async with asyncio.timeout(TEST_TIMEOUT_S):
        daemon = DaemonProcess(cfg, delay_s=delay_s)
        daemons.append(daemon)
        await wait_line(daemon, r"window #\d+ .* significance")
        for _ in range(16):
            body = (await asyncio.to_thread(get, f"http://127.0.0.1:{metrics_port}/metrics"))[1]
            lags.append(metric(body, "streamd_window_lag_seconds", stream="cam"))
            rss.append(_rss_kb(daemon.proc.pid))
            await asyncio.sleep(1)  # sampling a 16 s run once a second, not syncing
        body = (await asyncio.to_thread(get, f"http://127.0.0.1:{metrics_port}/metrics"))[1]
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 20) == 0
    busy = metric(body, "streamd_windows_dropped_total", reason="busy", stream="cam")
    analysed = metric(body, "streamd_windows_analyzed_total", stream="cam")
    cut = metric(body, "streamd_windows_total", stream="cam")
    assert busy >= 4, body
    assert analysed >= 4
    assert cut >= analysed + busy  # every window cut is analysed, dropped, or still pending
    # Lag: the newest analysed window ends at most ~one model call + one window behind.
    assert max(lags) < 2 * delay_s + 2 + 1.5, lags
    # Memory does not grow with the backlog it refuses to build (allow allocator noise).
    assert rss[-1] - rss[2] < 20_000, rss
    record_property("max_lag_s", round(max(lags), 2))  # reported with the resolution
    record_property("busy_drops", busy)
    record_property("rss_kb", f"{rss[2]} -> {rss[-1]}")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[Mosquitto]:
    with Mosquitto(tls=True, users={"alice": "wonderland"}) as broker:
        yield broker


@pytest.mark.parametrize("password", ["wonderland", "wrong"])
async def test_tls_and_password_file(
    secure_broker: Mosquitto,
    clips: ClipSet,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    password: str,
) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text(password + "\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        config(
            str(clips.scenecut.path),
            unique_topic,
            secure_broker.port,
            stream={"realtime": True},
            mqtt={
                "username": "alice",
                "password_file": str(secret),
                "ha_discovery": False,
                "tls": {"ca_certs": str(secure_broker.ca_certs)},
            },
        ),
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        Subscriber(secure_broker, f"{unique_topic}/#", password="wonderland") as sub,
    ):
        daemon = DaemonProcess(cfg)
        daemons.append(daemon)
        if password == "wonderland":
            assert await asyncio.to_thread(daemon.wait, 30) == 0
            assert payloads(sub, f"{unique_topic}/cam/events")
            return
        line = await wait_line(daemon, "refused the login")
        assert "'alice'" in line
        assert "wrong" not in line
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 20) == 0
    assert daemon.count("refused the login") == 1  # one clear line, not one per retry
    assert "Traceback" not in daemon.output


async def test_tiny_smolvlm_through_the_daemon(
    mosquitto: Mosquitto,
    clips: ClipSet,
    unique_topic: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    tiny_model_dir: Path,
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        config(
            str(clips.scenecut.path),
            unique_topic,
            mosquitto.port,
            model={"backend": "transformers", "id": str(tiny_model_dir), "max_new_tokens": 8},
            mqtt={"ha_discovery": False},
        ),
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT_S * 2),
        Subscriber(mosquitto, f"{unique_topic}/#") as sub,
    ):
        daemon = DaemonProcess(cfg)
        daemons.append(daemon)
        assert await asyncio.to_thread(daemon.wait, 90) == 0, daemon.output[-3000:]
        analysis = payloads(sub, f"{unique_topic}/cam/analysis")
    assert len(analysis) == 7  # 8 s at 1 fps, 2 s windows every 1 s
    for window in analysis:
        significance = window["significance"]
        assert significance is None or 1 <= int(significance) <= 10  # type: ignore[call-overload]
    assert daemon.count(rf"model ready: {re.escape(str(tiny_model_dir))} on cpu") == 1
