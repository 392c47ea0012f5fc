"""Storage through the real daemon: held events across a restart, a kill -9 mid-event.

Real processes only: ``streamd run`` (motion backend), mosquitto, PyAV-encoded video looped as
a live camera, the HTTP API read over a socket, the clip decoded with PyAV.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
from pathlib import Path

import av
import pytest
from PIL import Image

from tests.broker import Mosquitto, free_port
from tests.daemon_proc import DaemonProcess, write_config
from tests.media import Segment, write_clip
from tests.mqtt_tools import Gate, Subscriber
from tests.scrape import get
from tests.test_store import tiny_filesystem
from tests.waiting import eventually_sync

pytestmark = pytest.mark.slow
TEST_TIMEOUT_S = 120
EVENT_LINE = r"event (new|end) cam (\S+)"


@pytest.fixture(scope="module")
def blinking_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quiet 3 s, moving bars 1 s, with a tone: looped, an event every 4 s."""
    path = tmp_path_factory.mktemp("blink") / "blink.mp4"
    write_clip(path, [Segment(3, "black"), Segment(1, "bars")], fps=10, audio=True)
    return path


@pytest.fixture(scope="module")
def busy_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Moving bars all along: looped, an event that never ends by itself."""
    path = tmp_path_factory.mktemp("busy") / "busy.mp4"
    write_clip(path, [Segment(4, "bars")], fps=10, gop=10)
    return path


def config(clip: Path, storage: Path, http_port: int, mqtt: dict[str, object]) -> dict[str, object]:
    return {
        "model": {"backend": "motion"},
        "mqtt": mqtt,
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "storage": {"dir": str(storage), "pre_roll_s": 1, "post_roll_s": 1},
        "shutdown_timeout_s": 3,
        "defaults": {
            "window_s": 2,
            "stride_s": 1,
            "min_significance": 5,
            "cooldown_s": 0,
            "motion_gate": 0,
        },
        "streams": [{"name": "cam", "url": str(clip), "live": True}],
    }


def logged(daemon: DaemonProcess) -> list[tuple[str, str]]:
    return re.findall(EVENT_LINE, daemon.output)


def wait_events(daemon: DaemonProcess, count: int) -> None:
    eventually_sync(lambda: len(logged(daemon)) >= count, 40, f"{count} events logged")


async def test_events_held_across_a_restart_all_arrive_with_seq_continuing(
    blinking_clip: Path, unique_topic: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        with Mosquitto() as broker:
            broker.stop()  # the broker is away from the start
            gate = Gate(broker)
            mqtt = {"host": "127.0.0.1", "port": gate.port, "topic_prefix": unique_topic}
            mqtt["ha_discovery"] = False
            cfg = write_config(
                tmp_path / "c.yaml", config(blinking_clip, tmp_path / "store", free_port(), mqtt)
            )
            try:
                first = DaemonProcess(cfg)
                daemons.append(first)
                await asyncio.to_thread(wait_events, first, 2)
                first.signal(signal.SIGTERM)  # stopped with every event held
                assert await asyncio.to_thread(first.wait, 20) == 0
                held = logged(first)
                assert "events still undelivered" in first.output or "still in the outbox" in (
                    first.output
                )
                second = DaemonProcess(cfg)
                daemons.append(second)
                await asyncio.to_thread(second.wait_for_line, r"storage: \d+ event message", 20)
                await asyncio.to_thread(wait_events, second, 2)
                broker.start()
                async with Subscriber(broker, f"{unique_topic}/cam/events") as sub:
                    await gate.open()  # only now can the daemon reach the broker
                    newest = logged(second)[-1][1]
                    await sub.until(lambda: newest in _ids(sub), within=30)
                    second.signal(signal.SIGTERM)
                    assert await asyncio.to_thread(second.wait, 20) == 0
                    last = logged(second)[-1][1]
                    await sub.until(lambda: last in _ids(sub), within=15)
            finally:
                await gate.aclose()
    received = [json.loads(bytes(m.payload)) for m in sub.messages]
    seqs = list(dict.fromkeys(int(m["seq"]) for m in received))
    assert seqs == list(range(1, len(seqs) + 1))  # gap-free across both runs, in order
    pairs = {(str(m["type"]), str(m["id"])) for m in received}
    both_runs = held + logged(second)
    assert [p for p in both_runs if p not in pairs] == []  # every event of both runs arrived
    first_run_ids = {event_id for _, event_id in held}
    first_run_seqs = [int(m["seq"]) for m in received if m["id"] in first_run_ids]
    second_run_seqs = [int(m["seq"]) for m in received if m["id"] not in first_run_ids]
    assert max(first_run_seqs) < min(second_run_seqs)  # seq continued, never back to 1
    assert all(m["clip"] and m["snapshot"] for m in received if m["type"] == "end")


async def test_kill_9_mid_event_the_event_is_ended_and_its_clip_plays(
    busy_clip: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    storage = tmp_path / "store"
    cfg = write_config(tmp_path / "c.yaml", config(busy_clip, storage, port, {"enabled": False}))
    base = f"http://127.0.0.1:{port}"
    async with asyncio.timeout(TEST_TIMEOUT_S):
        first = DaemonProcess(cfg)
        daemons.append(first)
        line = await asyncio.to_thread(first.wait_for_line, r"event new cam \S+", 30)
        event_id = line.split("event new cam ")[1].split()[0]
        clip = storage / "clips" / f"{event_id}.mp4"
        await asyncio.to_thread(
            eventually_sync, lambda: _decodable_s(clip) >= 2.0, 30, "2 s of clip on disk"
        )
        first.signal(signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
        played = _decodable_s(clip)
        assert played >= 2.0  # playable up to the last fragment before the kill

        second = DaemonProcess(cfg)
        daemons.append(second)
        await asyncio.to_thread(second.wait_for_line, r"ended 1 event\(s\) left open", 20)
        status, body = await asyncio.to_thread(_wait_get, f"{base}/api/events/{event_id}")
        assert status == 200
        doc = json.loads(body)
        assert (doc["type"], doc["reason"]) == ("end", "interrupted")
        assert doc["clip"] == f"/api/events/{event_id}/clip.mp4"
        served = tmp_path / "served.mp4"
        status, data = await asyncio.to_thread(_get_bytes, f"{base}{doc['clip']}")
        assert status == 200
        served.write_bytes(data)
        assert _decodable_s(served) >= played - 0.01  # what was written is still there
        status, jpeg = await asyncio.to_thread(_get_bytes, f"{base}{doc['snapshot']}")
        assert status == 200
        with av.open(str(busy_clip)) as source:
            size = (source.streams.video[0].width, source.streams.video[0].height)
        assert Image.open(io.BytesIO(jpeg)).size == size  # the source's resolution, not 512²
        second.signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 20) == 0


def _ids(sub: Subscriber) -> set[str]:
    return {str(json.loads(bytes(m.payload))["id"]) for m in sub.messages}


def _decodable_s(path: Path) -> float:
    """Seconds of video PyAV decodes from ``path`` (0 when it does not open yet)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            times = [f.time for f in container.decode(stream) if f.time is not None]

    except (av.error.FFmpegError, OSError):
        return 0.0
    return float(times[-1] - times[0]) if times else 0.0


def _wait_get(url: str) -> tuple[int, str]:
    eventually_sync(lambda: get(url)[0] in (200, 404), 20, f"{url} answers")
    eventually_sync(lambda: get(url)[0] == 200, 10, f"{url} is 200")
    return get(url)


def _get_bytes(url: str) -> tuple[int, bytes]:
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


async def test_a_full_disk_is_one_error_and_the_daemon_goes_on(
    blinking_clip: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    with tiny_filesystem(tmp_path / "small", "2m") as storage:
        cfg = write_config(
            tmp_path / "c.yaml", config(blinking_clip, storage, port, {"enabled": False})
        )
        async with asyncio.timeout(TEST_TIMEOUT_S):
            daemon = DaemonProcess(cfg)
            daemons.append(daemon)
            await asyncio.to_thread(wait_events, daemon, 2)
            filler = storage / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as handle:
                while True:  # fill what is left
                    handle.write(b"\0" * 65536)
                    handle.flush()
            before = len(logged(daemon))
            await asyncio.to_thread(wait_events, daemon, before + 2)  # events go on
            await asyncio.to_thread(daemon.wait_for_line, r"storage: cannot write events\.db", 20)
            assert daemon.proc.poll() is None  # alive
            assert (
                daemon.count(r"storage: cannot write events.db") <= 1
            )  # one line, not one per event
            status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
            assert status == 200
            filler.unlink()
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 20) == 0
        assert "Traceback" not in daemon.output
