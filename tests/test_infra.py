"""The test infrastructure itself: clips, broker, RTSP camera and HTTP server behave as promised."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import aiomqtt
import av
import numpy as np
import pytest

from tests import conftest
from tests.broker import Mosquitto
from tests.conftest import RtspServerFactory
from tests.media import ClipInfo, ClipSet, Codec, Segment, write_clip

RTSP_READ_S = 1.0
PASSWORD = "secret"
RTSP_OPTIONS = {
    "rtsp_transport": "tcp",
    "timeout": str(int(RTSP_READ_S * 1e6)),
    # The default analyzeduration (5 s) makes av.open take ~2.8 s on a 10 fps stream.
    "analyzeduration": "500000",
}


def decode_all(path: Path | str) -> list[av.VideoFrame]:
    with av.open(str(path), timeout=(5, 5)) as container:
        return list(container.decode(video=0))


def mean_levels(frames: list[av.VideoFrame]) -> list[float]:
    return [float(f.to_ndarray(format="gray").mean()) for f in frames]


# --- clips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["static", "motion", "scenecut", "activity", "h264", "long"])
def test_clip_frame_count_and_pts_are_exact(clips: ClipSet, name: str) -> None:
    info: ClipInfo = getattr(clips, name)
    frames = decode_all(info.path)
    assert len(frames) == info.frame_count == round(info.duration_s * info.fps)
    assert [f.time for f in frames] == [i / info.fps for i in range(info.frame_count)]
    assert [f.pts * f.time_base for f in frames if f.pts is not None and f.time_base] == [
        Fraction(i, info.fps) for i in range(info.frame_count)
    ]
    assert (frames[0].width, frames[0].height) == (info.width, info.height) == (64, 48)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".ts"])
@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_write_clip_containers_and_codecs(tmp_path: Path, suffix: str, codec: Codec) -> None:
    script = [Segment(1, "black"), Segment(0.5, "flash"), Segment(0.5, "noise")]
    info = write_clip(tmp_path / f"c{suffix}", script, codec=codec, audio=True, gop=5)
    with av.open(str(info.path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        expected_codec = "h264" if codec == "libx264" else codec
        assert container.streams.video[0].codec_context.name == expected_codec
        frames = list(container.decode(video=0))
    assert [f.time for f in frames] == [i / 10 for i in range(20)]
    assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 5, 10, 15]
    levels = mean_levels(frames)
    assert max(levels[:10]) < 20  # black
    flash = levels[10:15]
    assert [level > 128 for level in flash] == [False, True, False, True, False]


def test_segment_content_matches_script(clips: ClipSet) -> None:
    frames = [f.to_ndarray(format="gray").astype(np.int16) for f in decode_all(clips.activity.path)]
    diffs = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(frames)]
    assert clips.activity.segment_bounds() == [
        (0.0, 6.0, "black"),
        (6.0, 10.0, "bars"),
        (10.0, 16.0, "black"),
    ]
    # Frame-to-frame change is ~0 in the black segments and large while bars move.
    assert max(diffs[:59]) < 2
    assert min(diffs[60:99]) > 50
    assert max(diffs[100:]) < 2
    scenecut = mean_levels(decode_all(clips.scenecut.path))
    assert max(scenecut[:40]) < 20
    assert min(scenecut[40:]) > 230


def test_h264_clip_has_fixed_gop(clips: ClipSet) -> None:
    frames = decode_all(clips.h264.path)
    assert [i for i, f in enumerate(frames) if f.key_frame] == list(range(0, 100, 10))


def test_audio_clip_has_audio_stream(clips: ClipSet) -> None:
    with av.open(str(clips.with_audio.path)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        samples = sum(f.samples for f in container.decode(audio=0))
    assert audio.sample_rate == 16_000
    assert abs(samples / 16_000 - clips.with_audio.duration_s) < 0.1


def test_truncated_and_corrupt_copies(clips: ClipSet) -> None:
    full = clips.h264.path.read_bytes()
    corrupt = clips.corrupt.read_bytes()
    assert len(corrupt) == len(full)
    assert corrupt != full
    assert clips.truncated_mp4.stat().st_size == len(full) // 2
    assert 0 < clips.truncated.stat().st_size < clips.h264_mkv.path.stat().st_size
    # A streamable container cut short decodes its first frames and ends normally.
    assert 10 < len(decode_all(clips.truncated)) < clips.h264_mkv.frame_count
    # An mp4 loses its index (moov atom, written last): it does not open at all.
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(clips.truncated_mp4)).close()
    # Garbage inside a frame: some frames decode, then avcodec_send_packet raises.
    decoded: list[av.VideoFrame] = []
    with av.open(str(clips.corrupt)) as container:
        frames = container.decode(video=0)
        with pytest.raises(av.error.InvalidDataError):
            decoded.extend(frames)
    assert 0 < len(decoded) < clips.h264.frame_count


def test_hls_playlist_over_http(clips: ClipSet, http_server: Callable[[Path], str]) -> None:
    playlist = clips.hls
    assert sorted(p.name for p in playlist.parent.glob("*.ts")) == [
        f"seg{i:03d}.ts" for i in range(4)
    ]
    assert "#EXT-X-ENDLIST" in playlist.read_text()
    base = http_server(playlist.parent)
    with av.open(f"{base}/{playlist.name}", timeout=(5, 5)) as container:
        assert container.format.name == "hls"
        frames = list(container.decode(video=0))
    assert len(frames) == 70
    assert frames[0].time == 0.0
    assert frames[-1].time == pytest.approx(6.9)


# --- mosquitto ------------------------------------------------------------------------------


async def test_mosquitto_retained_message(mosquitto: Mosquitto, unique_topic: str) -> None:
    topic = f"{unique_topic}/state"
    async with asyncio.timeout(5):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            await pub.publish(topic, b"online", qos=1, retain=True)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as sub:
            await sub.subscribe(f"{unique_topic}/#", qos=1)
            message = await anext(sub.messages)
            assert (str(message.topic), message.payload, message.retain) == (
                topic,
                b"online",
                True,
            )
            await sub.publish(topic, b"", qos=1, retain=True)  # clear the retained message


async def test_mosquitto_restart_keeps_port(unique_topic: str) -> None:
    with Mosquitto() as broker:
        port = broker.port
        for kill in (True, False):
            # A connection is open while the broker dies (the broker's side then lingers in
            # TIME_WAIT): the listener must still rebind the same port.
            with socket.create_connection((broker.host, broker.port), timeout=5):
                broker.restart(kill=kill)
            assert broker.port == port
            assert broker.running
            async with asyncio.timeout(5), aiomqtt.Client(broker.host, broker.port) as client:
                await client.publish(f"{unique_topic}/x", b"1", qos=1)
        broker.kill()
        assert not broker.running
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(5), aiomqtt.Client(broker.host, broker.port):
                pass


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[Mosquitto]:
    with Mosquitto(tls=True, users={"alice": PASSWORD}) as broker:
        yield broker


async def test_tls_password_broker(secure_broker: Mosquitto, unique_topic: str) -> None:
    b = secure_broker
    tls = aiomqtt.TLSParameters(ca_certs=b.ca_certs)
    async with asyncio.timeout(5):
        async with aiomqtt.Client(
            b.host, b.port, username="alice", password=PASSWORD, tls_params=tls
        ) as client:
            await client.publish(f"{unique_topic}/x", b"1", qos=1)
        # A client certificate is accepted too (not required by this listener).
        with_cert = aiomqtt.TLSParameters(
            ca_certs=b.ca_certs, certfile=b.client_cert, keyfile=b.client_key
        )
        async with aiomqtt.Client(
            b.host, b.port, username="alice", password=PASSWORD, tls_params=with_cert
        ):
            pass
    # A wrong password: CONNACK "Not authorized" -> MqttConnectError (an MqttCodeError).
    for user, password in (("alice", "wrong"), (None, None)):
        with pytest.raises(aiomqtt.MqttCodeError) as excinfo:
            async with (
                asyncio.timeout(5),
                aiomqtt.Client(b.host, b.port, username=user, password=password, tls_params=tls),
            ):
                pass
        assert isinstance(excinfo.value, aiomqtt.exceptions.MqttConnectError)
        assert "Not authorized" in str(excinfo.value)


async def test_plain_client_on_tls_listener_times_out(secure_broker: Mosquitto) -> None:
    # No TLS against a TLS listener: no error, the CONNACK just never comes.
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with (
            asyncio.timeout(1),
            aiomqtt.Client(
                secure_broker.host, secure_broker.port, username="alice", password=PASSWORD
            ),
        ):
            pass
    assert time.monotonic() - started < 1.5


# --- RTSP -----------------------------------------------------------------------------------


def open_rtsp(url: str) -> av.container.InputContainer:
    return av.open(url, options=RTSP_OPTIONS, timeout=(5, RTSP_READ_S))


@pytest.mark.rtsp
def test_rtsp_serves_file(rtsp_server: RtspServerFactory, clips: ClipSet) -> None:
    server = rtsp_server(file=clips.h264.path)
    assert server.url == f"rtsp://127.0.0.1:{server.port}/live"
    with open_rtsp(server.url) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 64, 48)
        assert stream.time_base == Fraction(1, 90000)
        frames = []
        for frame in container.decode(stream):
            frames.append(frame)
            if len(frames) == 5:
                break
    # The first RTSP frame may carry no timestamp; the next ones step by 1/fps.
    times = [f.time for f in frames[1:]]
    assert times == pytest.approx([0.1 * i for i in range(1, 5)])


@pytest.mark.rtsp
def test_rtsp_kill_ends_reader_and_restart_serves_again(
    rtsp_server: RtspServerFactory,
) -> None:
    server = rtsp_server(live=True)
    with open_rtsp(server.url) as container:
        frames = container.decode(video=0)
        for _ in range(3):
            next(frames)
        server.kill()
        started = time.monotonic()
        # Over TCP a dead server just ends the stream: no exception.
        remaining = sum(1 for _ in frames)
        elapsed = time.monotonic() - started
    assert elapsed < 2 * RTSP_READ_S, elapsed
    assert remaining < 20
    with pytest.raises(av.error.ConnectionRefusedError):
        open_rtsp(server.url).close()
    port = server.port
    server.restart()
    assert server.port == port
    with open_rtsp(server.url) as container:
        next(container.decode(video=0))


@pytest.mark.rtsp
def test_rtsp_pause_times_out_blocked_read(rtsp_server: RtspServerFactory) -> None:
    server = rtsp_server(live=True, pattern="black")
    with open_rtsp(server.url) as container:
        frames = container.decode(video=0)
        next(frames)
        server.pause()
        started = time.monotonic()
        with pytest.raises((av.error.ExitError, av.error.TimeoutError)):
            for _ in frames:
                pass
        elapsed = time.monotonic() - started
    assert elapsed < 2 * RTSP_READ_S + 1.5, elapsed
    server.resume()
    with open_rtsp(server.url) as container:
        frame = next(container.decode(video=0))
    assert frame.to_ndarray(format="gray").mean() < 30  # pattern=black


def test_rtsp_unavailable_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "rtsp_unavailable_reason", lambda: "no gi here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no gi here"):
        conftest.require_rtsp()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="no gi here"):
        conftest.require_rtsp()
