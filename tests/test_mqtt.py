"""MqttPublisher against a real mosquitto, and the pure HA discovery builder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiomqtt
import pytest
from prometheus_client import CollectorRegistry

from streamd.config import MqttConfig, TlsConfig
from streamd.domain import Event, EventType
from streamd.metrics import Metrics
from streamd.payloads import encode, event_payload
from streamd.sinks.discovery import (
    DiscoveryContext,
    config_filter,
    discovery_configs,
    node_id_for,
    stream_configs,
)
from streamd.sinks.mqtt import MqttPublisher
from tests.broker import Mosquitto
from tests.mqtt_tools import Gate, Subscriber, poll, retained

REPO = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 20.0
WAIT_S = 10.0
USERS = {"alice": "wonderland"}


# -- helpers ----------------------------------------------------------------------------------


def make_config(port: int, prefix: str, **overrides: object) -> MqttConfig:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "client_id": f"streamd-test-{uuid.uuid4().hex[:8]}",
        "keepalive_s": 5,
        "discovery_prefix": f"{prefix}/ha",
        "ha_discovery": False,
    }
    values.update(overrides)
    return MqttConfig.model_validate(values)


def make_event(seq: int, stream: str = "cam", kind: EventType = EventType.NEW) -> Event:
    return Event(
        type=kind,
        id=f"1764012345.123456-{stream}-1",
        stream=stream,
        seq=seq,
        start_s=float(seq),
        end_s=float(seq) + 8.0,
        wall_start_s=1_764_012_345.0 + seq,
        wall_end_s=1_764_012_353.0 + seq,
        significance=8,
        peak_significance=8,
        description=f"window {seq}",
        windows=1,
        best_window=seq,
        best_frame=0,
    )


def send(publisher: MqttPublisher, seqs: Iterable[int], stream: str = "cam") -> None:
    for seq in seqs:
        event = make_event(seq, stream)
        publisher.event(event, encode(event_payload(event, "surveillance", "test-model")))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def attempts_failed(caplog: pytest.LogCaptureFixture) -> int:
    """Connection attempts the publisher logged as failed (the first at WARNING, then DEBUG)."""
    return sum("cannot connect" in r.getMessage() for r in caplog.records)


def seqs_of(messages: Iterable[aiomqtt.Message]) -> list[int]:
    return [json.loads(bytes(m.payload))["seq"] for m in messages]


@contextlib.asynccontextmanager
async def running(publisher: MqttPublisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run(), name="test.mqtt")
    try:
        yield task
    finally:
        await publisher.close(5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture(scope="module")
def secure_broker() -> Iterable[Mosquitto]:
    with Mosquitto(tls=True, users=USERS) as broker:
        yield broker


# -- against the broker -----------------------------------------------------------------------


async def test_events_arrive_in_order_with_qos1(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        publisher = MqttPublisher(make_config(mosquitto.port, unique_topic), metrics, ["cam"])
        events = f"{unique_topic}/cam/events"
        async with Subscriber(mosquitto, events) as sub, running(publisher):
            send(publisher, range(1, 101))
            await sub.until(lambda: len(sub.messages) >= 100)
            await publisher.flush(5)
            assert publisher.pending == 0
        assert seqs_of(sub.messages) == list(range(1, 101))
        assert {(m.qos, m.retain) for m in sub.messages} == {(1, False)}
        assert json.loads(bytes(sub.messages[0].payload))["stream"] == "cam"
        published = "streamd_events_published_total"
        assert sample(registry, published, stream="cam", type="new") == 100
        assert sample(registry, "streamd_stage_seconds_count", stage="publish") == 100
        assert sample(registry, "streamd_outbox_messages") == 0


async def test_available_status_snapshot_are_retained(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        publisher = MqttPublisher(make_config(mosquitto.port, unique_topic), metrics, ["cam"])
        status, snapshot = f"{unique_topic}/cam/status", f"{unique_topic}/cam/snapshot"
        publisher.stream_status("cam", True)  # before connecting: published on connect
        publisher.snapshot("cam", b"\xff\xd8old")
        async with Subscriber(mosquitto, f"{unique_topic}/#") as sub, running(publisher):
            await sub.until(lambda: bool(sub.on(status)) and bool(sub.on(snapshot)))
            assert sample(registry, "streamd_mqtt_connected") == 1
            publisher.stream_status("cam", False)
            publisher.snapshot("cam", b"\xff\xd8new")
            await sub.until(lambda: len(sub.on(snapshot)) >= 2 and len(sub.on(status)) >= 2)
            late = await retained(mosquitto, f"{unique_topic}/#")
            assert late[f"{unique_topic}/available"] == b"online"
        assert late[status] == b"offline"
        assert late[snapshot] == b"\xff\xd8new"
        assert [m.payload for m in sub.on(f"{unique_topic}/available")] == [b"online", b"offline"]


async def test_broker_killed_and_restarted_loses_nothing(
    unique_topic: str,
    metrics: Metrics,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamd.sinks.mqtt")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        events = f"{unique_topic}/cam/events"
        with Mosquitto() as broker:
            gate = Gate(broker)
            await gate.open()
            publisher = MqttPublisher(make_config(gate.port, unique_topic), metrics, ["cam"])
            try:
                async with running(publisher):
                    async with Subscriber(broker, events) as before:
                        send(publisher, range(1, 11))
                        await before.until(lambda: len(before.messages) >= 10)
                        broker.kill()
                        gate.shut()  # the publisher can only come back once we re-open it
                        send(publisher, range(11, 21))  # some while it still thinks it is up
                        await poll(lambda: sample(registry, "streamd_mqtt_connected") == 0)
                        send(publisher, range(21, 31))
                        await poll(lambda: attempts_failed(caplog) >= 2)  # retrying meanwhile
                    broker.start()  # same port
                    async with Subscriber(broker, events) as after:
                        await gate.open()
                        await after.until(lambda: 30 in seqs_of(after.messages))
                        await publisher.flush(5)
                        assert publisher.pending == 0
            finally:
                await gate.aclose()
        seqs = seqs_of([*before.messages, *after.messages])
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == list(range(1, 31))  # in order, gap-free; duplicates allowed
        assert sample(registry, "streamd_mqtt_dropped_total", reason="outbox_full") == 0
        assert sample(registry, "streamd_events_published_total", stream="cam", type="new") == 30


async def test_no_broker_at_start_holds_events_until_one_appears(
    mosquitto: Mosquitto,
    unique_topic: str,
    metrics: Metrics,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamd.sinks.mqtt")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        gate = Gate(mosquitto)  # nothing listens on gate.port yet
        publisher = MqttPublisher(make_config(gate.port, unique_topic), metrics, ["cam"])
        events = f"{unique_topic}/cam/events"
        try:
            async with running(publisher) as task, Subscriber(mosquitto, events) as sub:
                send(publisher, range(1, 6))
                await poll(lambda: attempts_failed(caplog) >= 3)
                await publisher.flush(0.1)  # gives up: no broker
                assert publisher.pending == 5
                assert not task.done()
                assert sample(registry, "streamd_mqtt_connected") == 0
                assert sample(registry, "streamd_outbox_messages") == 5
                await gate.open()  # a broker appears on that port
                await sub.until(lambda: len(sub.messages) >= 5)
                await publisher.flush(5)
            assert publisher.pending == 0
        finally:
            await gate.aclose()
        assert seqs_of(sub.messages) == [1, 2, 3, 4, 5]
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "streamd.sinks.mqtt" and r.levelno >= logging.WARNING
        ]
        assert warnings[0] == (
            f"mqtt: cannot connect to 127.0.0.1:{gate.port}: [Errno 111] Connection refused"
        )
        assert warnings[1:] == ["mqtt: 5 events still in the outbox"]  # the flush(0.1)


async def test_outbox_overflow_drops_the_oldest(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        config = make_config(mosquitto.port, unique_topic, outbox_size=5)
        publisher = MqttPublisher(config, metrics, ["cam"])
        send(publisher, range(1, 9))  # not connected yet: 8 events into 5 places
        assert sample(registry, "streamd_mqtt_dropped_total", reason="outbox_full") == 3
        assert sample(registry, "streamd_outbox_messages") == 5
        async with (
            Subscriber(mosquitto, f"{unique_topic}/cam/events") as sub,
            running(publisher),
        ):
            await sub.until(lambda: len(sub.messages) >= 5)
            await publisher.flush(5)
            assert publisher.pending == 0
        assert seqs_of(sub.messages) == [4, 5, 6, 7, 8]


async def test_analysis_is_qos0_held_while_first_connecting_and_bounded(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        publisher = MqttPublisher(make_config(mosquitto.port, unique_topic), metrics, ["cam"])
        for seq in range(1, 71):  # before run: the first connection is still to come
            publisher.analysis("cam", b'{"seq":%d}' % seq)
        assert sample(registry, "streamd_mqtt_dropped_total", reason="disconnected") == 0
        assert sample(registry, "streamd_mqtt_dropped_total", reason="analysis_full") == 6
        analysis = f"{unique_topic}/cam/analysis"
        async with Subscriber(mosquitto, analysis) as sub:
            task = asyncio.create_task(publisher.run())
            await sub.until(lambda: len(sub.messages) >= 64)
            publisher.analysis("cam", b'{"seq":71}')
            publisher.analysis("cam", b'{"seq":72}')
            await publisher.close(5)  # at once: what is queued still goes out before goodbye
            await task
            await sub.until(lambda: len(sub.messages) >= 66)
        assert [json.loads(bytes(m.payload))["seq"] for m in sub.messages] == list(range(7, 73))
        assert {m.qos for m in sub.messages} == {0}
        assert sample(registry, "streamd_mqtt_dropped_total", reason="disconnected") == 0


async def test_analysis_dropped_and_counted_once_an_attempt_failed(
    mosquitto: Mosquitto,
    unique_topic: str,
    metrics: Metrics,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamd.sinks.mqtt")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        gate = Gate(mosquitto)  # nothing listens on gate.port yet
        publisher = MqttPublisher(make_config(gate.port, unique_topic), metrics, ["cam"])
        analysis = f"{unique_topic}/cam/analysis"

        def dropped() -> float:
            return sample(registry, "streamd_mqtt_dropped_total", reason="disconnected")

        try:
            async with Subscriber(mosquitto, analysis) as sub, running(publisher):
                publisher.analysis("cam", b'{"seq":1}')  # held: the first attempt is under way
                await poll(lambda: attempts_failed(caplog) >= 1)
                assert dropped() == 1  # ... and dropped when it failed
                publisher.analysis("cam", b'{"seq":2}')  # disconnected: dropped at once
                assert dropped() == 2
                await gate.open()
                await poll(lambda: sample(registry, "streamd_mqtt_connected") == 1)
                publisher.analysis("cam", b'{"seq":3}')
                await sub.until(lambda: bool(sub.messages))
        finally:
            await gate.aclose()
        assert [(m.payload, m.qos) for m in sub.messages] == [(b'{"seq":3}', 0)]
        assert dropped() == 2


CHILD = """
import asyncio, sys
from prometheus_client import CollectorRegistry
from streamd.config import MqttConfig
from streamd.metrics import Metrics
from streamd.sinks.mqtt import MqttPublisher

config = MqttConfig(port=int(sys.argv[1]), topic_prefix=sys.argv[2], client_id=sys.argv[3],
                    keepalive_s=5, ha_discovery=False)
asyncio.run(MqttPublisher(config, Metrics(CollectorRegistry()), ["cam"]).run())
"""


async def test_will_says_offline_when_the_process_dies(
    mosquitto: Mosquitto, unique_topic: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        available = f"{unique_topic}/available"
        async with Subscriber(mosquitto, available) as sub:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD,
                str(mosquitto.port),
                unique_topic,
                f"streamd-child-{uuid.uuid4().hex[:8]}",
                cwd=REPO,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await sub.until(lambda: [m.payload for m in sub.messages] == [b"online"])
            finally:
                child.kill()  # SIGKILL: no DISCONNECT, the broker publishes the will
                _, stderr = await child.communicate()
            await sub.until(lambda: len(sub.messages) >= 2)
        assert [m.payload for m in sub.messages] == [b"online", b"offline"], stderr.decode()
        assert (await retained(mosquitto, available))[available] == b"offline"


async def test_clean_close_says_offline_and_ends_run(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        publisher = MqttPublisher(make_config(mosquitto.port, unique_topic), metrics, ["cam"])
        available = f"{unique_topic}/available"
        async with Subscriber(mosquitto, available) as sub:
            task = asyncio.create_task(publisher.run())
            await sub.until(lambda: bool(sub.on(available)))
            assert sample(registry, "streamd_mqtt_connected") == 1
            await publisher.close(5)
            assert task.done()
            await task
            await sub.until(lambda: len(sub.messages) >= 2)
        assert [m.payload for m in sub.messages] == [b"online", b"offline"]
        assert sample(registry, "streamd_mqtt_connected") == 0
        assert (await retained(mosquitto, available))[available] == b"offline"


@pytest.mark.parametrize("run", range(5))  # it was a race: 3 of 4 clean stops left "online"
async def test_close_says_every_stream_offline_before_available(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, run: int
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        streams = ["front", "back", "side"]
        publisher = MqttPublisher(make_config(mosquitto.port, unique_topic), metrics, streams)
        status = [f"{unique_topic}/{stream}/status" for stream in streams]
        available = f"{unique_topic}/available"

        def last(topic: str) -> bytes | None:
            messages = sub.on(topic)
            return bytes(messages[-1].payload) if messages else None

        async with Subscriber(mosquitto, f"{unique_topic}/#") as sub:
            task = asyncio.create_task(publisher.run())
            for stream in streams:
                publisher.stream_status(stream, True)
            await sub.until(lambda: all(last(topic) == b"online" for topic in status))
            # "front" is left online (a pipeline that never said goodbye), "back" says offline
            # just before close (still unsent then), "side" reports in late, during close.
            publisher.stream_status("back", False)
            closing = asyncio.create_task(publisher.close(5))
            await asyncio.sleep(0)  # let close() begin
            publisher.stream_status("side", True)
            await closing
            assert task.done()
            await task
            await sub.until(lambda: last(available) == b"offline")
        late = await retained(mosquitto, f"{unique_topic}/#")
        assert [late[topic] for topic in status] == [b"offline"] * 3
        assert late[available] == b"offline"
        topics = [m.topic.value for m in sub.messages]
        goodbye = len(topics) - 1 - topics[::-1].index(available)
        for topic in status:
            final = max(i for i, t in enumerate(topics) if t == topic)
            assert final < goodbye, topics  # every stream offline before available offline
            assert bytes(sub.messages[final].payload) == b"offline"


async def test_cancel_without_close_still_says_offline(
    mosquitto: Mosquitto, unique_topic: str, metrics: Metrics, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        publisher = MqttPublisher(make_config(mosquitto.port, unique_topic), metrics, ["cam"])
        publisher.stream_status("cam", True)
        task = asyncio.create_task(publisher.run())
        await poll(lambda: sample(registry, "streamd_mqtt_connected") == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        late = await retained(mosquitto, f"{unique_topic}/#")
        assert late[f"{unique_topic}/available"] == b"offline"
        assert late[f"{unique_topic}/cam/status"] == b"offline"


@pytest.mark.parametrize("insecure", [False, True], ids=["verified", "insecure"])
async def test_tls_and_password(
    secure_broker: Mosquitto, unique_topic: str, metrics: Metrics, insecure: bool
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        assert secure_broker.ca_certs is not None
        # insecure: no CA given, the broker's certificate is not checked at all
        tls = TlsConfig(insecure=True) if insecure else TlsConfig(ca_certs=secure_broker.ca_certs)
        config = make_config(
            secure_broker.port, unique_topic, username="alice", password=USERS["alice"], tls=tls
        )
        publisher = MqttPublisher(config, metrics, ["cam"])
        async with (
            Subscriber(secure_broker, f"{unique_topic}/cam/events") as sub,
            running(publisher),
        ):
            send(publisher, [1, 2])
            await sub.until(lambda: len(sub.messages) >= 2)
        assert seqs_of(sub.messages) == [1, 2]


async def test_wrong_password_logs_one_clear_error_and_keeps_trying(
    secure_broker: Mosquitto,
    unique_topic: str,
    metrics: Metrics,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamd.sinks.mqtt")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        assert secure_broker.ca_certs is not None
        config = make_config(
            secure_broker.port,
            unique_topic,
            username="alice",
            password=USERS["alice"] + "-wrong",
            tls=TlsConfig(ca_certs=Path(secure_broker.ca_certs)),
        )
        publisher = MqttPublisher(config, metrics, ["cam"])

        def refusals() -> int:
            return secure_broker.log_text().count("disconnected, not authorised")

        before = refusals()
        async with running(publisher) as task:
            await poll(lambda: refusals() >= before + 3)  # three attempts, backoff in between
            assert not task.done()
            assert sample(registry, "streamd_mqtt_connected") == 0
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamd.sinks.mqtt" and r.levelno >= logging.WARNING
    ]
    assert errors == [
        f"mqtt: broker 127.0.0.1:{secure_broker.port} refused the login for 'alice': not authorized"
    ]


async def test_ha_discovery_published_and_removed_streams_cleared(
    mosquitto: Mosquitto, unique_topic: str, registry: CollectorRegistry
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        config = make_config(mosquitto.port, unique_topic, ha_discovery=True)
        discovery = f"{config.discovery_prefix}/#"
        both = MqttPublisher(config, Metrics(registry), ["front", "back"], model_id="m/x")
        async with Subscriber(mosquitto, discovery) as sub, running(both):
            await sub.until(lambda: len(sub.messages) >= 10)
        configs = {m.topic.value: json.loads(bytes(m.payload)) for m in sub.messages}
        assert len(configs) == 10
        assert len({c["unique_id"] for c in configs.values()}) == 10
        for topic, payload in configs.items():
            assert payload["availability_topic"] == f"{unique_topic}/available"
            stream = "front" if "/front_" in topic else "back"
            watched = payload.get("state_topic", payload.get("topic"))
            assert str(watched).startswith(f"{unique_topic}/{stream}/")
        back = {t for t in configs if "/back_" in t}
        assert len(back) == 5

        front_only = MqttPublisher(config, Metrics(CollectorRegistry()), ["front"])
        async with Subscriber(mosquitto, discovery) as sub, running(front_only):

            def cleared() -> set[str]:
                return {m.topic.value for m in sub.messages if not m.payload}

            await sub.until(lambda: cleared() >= back)
        left = await retained(mosquitto, discovery)
        assert set(left) == set(configs) - back


# -- discovery builder (pure) -----------------------------------------------------------------

CTX = DiscoveryContext(
    topic_prefix="streamd",
    discovery_prefix="homeassistant",
    node_id="streamd",
    model_id="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    sw_version="0.1.0",
)
ENTITY_ID = re.compile(r"^(sensor|binary_sensor|camera)\.[a-z0-9_]+$")


def test_discovery_entities_follow_the_ha_schema() -> None:
    configs = stream_configs("front-door", CTX)
    by_key = {topic.split("/")[3]: (topic.split("/")[1], cfg) for topic, cfg in configs.items()}
    assert {k: c for k, (c, _) in by_key.items()} == {
        "front-door_last_event": "sensor",
        "front-door_significance": "sensor",
        "front-door_activity": "binary_sensor",
        "front-door_source": "binary_sensor",
        "front-door_snapshot": "camera",
    }
    for topic, cfg in configs.items():
        component = topic.split("/")[1]
        assert topic == f"homeassistant/{component}/streamd/{topic.split('/')[3]}/config"
        assert cfg["availability_topic"] == "streamd/available"
        assert (cfg["payload_available"], cfg["payload_not_available"]) == ("online", "offline")
        assert ENTITY_ID.match(str(cfg["default_entity_id"]))
        assert str(cfg["default_entity_id"]).startswith(f"{component}.")
        assert "object_id" not in cfg
        assert cfg["device"] == {
            "identifiers": ["streamd_front-door"],
            "name": "streamd front-door",
            "manufacturer": "streamd",
            "model": CTX.model_id,
            "sw_version": "0.1.0",
        }
        if component == "camera":
            assert cfg["topic"] == "streamd/front-door/snapshot"
            assert "state_topic" not in cfg
        else:
            assert "topic" not in cfg
    _, last = by_key["front-door_last_event"]
    assert last["state_topic"] == last["json_attributes_topic"] == "streamd/front-door/events"
    _, activity = by_key["front-door_activity"]
    assert (activity["payload_on"], activity["payload_off"]) == ("ON", "OFF")
    assert activity["device_class"] in {"motion", "occupancy"}
    _, source = by_key["front-door_source"]
    assert source["state_topic"] == "streamd/front-door/status"
    assert (source["payload_on"], source["payload_off"]) == ("online", "offline")


def test_discovery_value_templates_render_from_the_event_json() -> None:
    jinja2 = pytest.importorskip("jinja2")
    configs = stream_configs("cam", CTX)

    def render(key: str, kind: EventType, description: str = "A person climbs the fence.") -> str:
        (cfg,) = [c for t, c in configs.items() if t.split("/")[3] == f"cam_{key}"]
        event = make_event(3, kind=kind)
        payload = event_payload(event, "surveillance", "m")
        payload["description"] = description
        template = jinja2.Environment(autoescape=True).from_string(str(cfg["value_template"]))
        return str(template.render(value_json=json.loads(encode(payload))))

    assert render("last_event", EventType.NEW) == "A person climbs the fence."
    assert len(render("last_event", EventType.NEW, "x" * 400)) == 255
    assert render("significance", EventType.UPDATE) == "8"
    assert render("activity", EventType.NEW) == "ON"
    assert render("activity", EventType.UPDATE) == "ON"
    assert render("activity", EventType.END) == "OFF"


def test_discovery_ids_are_unique_and_payloads_are_json() -> None:
    encoded = discovery_configs(["a", "b", "c_d"], CTX)
    assert len(encoded) == 15
    payloads = [json.loads(raw) for raw in encoded.values()]
    assert len({p["unique_id"] for p in payloads}) == 15
    assert len({p["default_entity_id"] for p in payloads}) == 15
    topic_filter = config_filter(CTX.discovery_prefix, CTX.node_id)
    assert all(aiomqtt.Topic(t).matches(topic_filter) for t in encoded)
    assert not aiomqtt.Topic("homeassistant/sensor/other/a_x/config").matches(topic_filter)


def test_node_id_is_the_client_id_made_safe() -> None:
    assert node_id_for("streamd") == "streamd"
    assert node_id_for("garage-2") == "garage-2"
    assert node_id_for("streamd.garage/cam 1") == "streamd_garage_cam_1"
    ctx = DiscoveryContext("p", "homeassistant", node_id_for("Garage.A"))
    (topic, cfg), *_ = stream_configs("cam", ctx).items()
    assert topic == "homeassistant/sensor/Garage_A/cam_last_event/config"
    assert cfg["default_entity_id"] == "sensor.garage_a_cam_last_event"
    assert "model" not in cfg["device"]  # type: ignore[operator]


# -- several instances on one broker ------------------------------------------------------


async def test_two_instances_with_their_own_client_id_and_prefix_coexist(
    mosquitto: Mosquitto, unique_topic: str, registry: CollectorRegistry
) -> None:
    a_prefix, b_prefix = f"{unique_topic}/a", f"{unique_topic}/b"
    ha = f"{unique_topic}/ha"
    a = MqttPublisher(
        make_config(mosquitto.port, a_prefix, discovery_prefix=ha, ha_discovery=True),
        Metrics(registry),
        ["cam"],
    )
    b = MqttPublisher(
        make_config(mosquitto.port, b_prefix, discovery_prefix=ha, ha_discovery=True),
        Metrics(CollectorRegistry()),
        ["cam"],
    )
    async with Subscriber(mosquitto, f"{unique_topic}/#") as sub, running(a), running(b):
        a.stream_status("cam", online=True)
        b.stream_status("cam", online=True)
        send(a, [1, 2])
        send(b, [1])
        await sub.until(
            lambda: (
                len(sub.on(f"{a_prefix}/cam/events")) == 2
                and len(sub.on(f"{b_prefix}/cam/events")) == 1
            )
        )
        await asyncio.wait_for(a.flush(), WAIT_S)
        await asyncio.wait_for(b.flush(), WAIT_S)
        # Past the discovery clean-up of both: neither cleared the other's entities.
        await asyncio.sleep(1.0)
        seen = await retained(mosquitto, f"{unique_topic}/#")
        for prefix in (a_prefix, b_prefix):  # no flapping: each connected once, and stayed
            assert [bytes(m.payload) for m in sub.on(f"{prefix}/available")] == [b"online"]
    configs = [t for t, payload in seen.items() if t.startswith(ha) and payload]
    node_a = node_id_for(a._config.client_id)
    node_b = node_id_for(b._config.client_id)
    assert any(node_a in t for t in configs)
    assert any(node_b in t for t in configs)


async def test_a_shared_client_id_is_named_in_one_line(
    mosquitto: Mosquitto,
    unique_topic: str,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="streamd.sinks.mqtt")
    shared = f"streamd-shared-{uuid.uuid4().hex[:6]}"
    a = MqttPublisher(
        make_config(mosquitto.port, f"{unique_topic}/a", client_id=shared),
        Metrics(registry),
        ["cam"],
    )
    b = MqttPublisher(
        make_config(mosquitto.port, f"{unique_topic}/b", client_id=shared),
        Metrics(CollectorRegistry()),
        ["cam"],
    )

    def named() -> list[str]:
        return [r.getMessage() for r in caplog.records if "client_id" in r.getMessage()]

    async with running(a), running(b):
        await poll(lambda: bool(named()), within=30.0)
    lines = named()
    assert len(lines) <= 2  # at most once per instance, not once per flap
    assert repr(shared) in lines[0]
    assert "mqtt.client_id" in lines[0]
