"""The daemon as a real process: lifecycle, signals, exit codes, health, systemd notify."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from streamd.errors import ExitCode
from tests.broker import free_port
from tests.daemon_proc import DaemonProcess, write_config
from tests.media import ClipSet
from tests.scrape import get, metric
from tests.waiting import eventually_sync


def config_for(url: str, port: int, **stream: object) -> dict[str, object]:
    return {
        "model": {"backend": "motion"},
        "mqtt": {"enabled": False},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "shutdown_timeout_s": 5,
        "defaults": {
            "window_s": 2,
            "stride_s": 1,
            "min_significance": 5,
            "cooldown_s": 0,
            "motion_gate": 0,  # every window analysed: the gate has tests of its own
        },
        "streams": [{"name": "cam", "url": url, **stream}],
    }


@pytest.mark.slow
def test_file_run_metrics_health_and_notify(clips: ClipSet, tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path / "c.yaml", config_for(str(clips.scenecut.path), port, realtime=True)
    )
    with DaemonProcess(cfg, notify=True, watchdog_usec=2_000_000) as daemon:
        base = f"http://127.0.0.1:{port}"
        eventually_sync(lambda: get(f"{base}/healthz")[0] == 200, 15, "healthy")
        assert get(f"{base}/healthz") == (200, "ok\n")
        eventually_sync(
            lambda: (
                metric(get(f"{base}/metrics")[1], "streamd_windows_analyzed_total", stream="cam")
                >= 2
            ),
            15,
        )
        body = get(f"{base}/metrics")[1]
        assert metric(body, "streamd_frames_decoded_total", stream="cam") > 0
        assert metric(body, "streamd_frames_sampled_total", stream="cam") > 0
        assert metric(body, "streamd_stream_up", stream="cam") == 1
        assert metric(body, "streamd_model_ready") == 1
        assert daemon.wait(30) == 0  # the file ended: a clean stop
        assert daemon.count(r"event new cam") == 1
        assert daemon.count(r"event end cam") == 1
        assert daemon.count(r"stream cam ended: end of stream") == 1
    assert daemon.notifications[0].startswith("READY=1")
    assert "WATCHDOG=1" in daemon.notifications
    assert daemon.notifications[-1] == "STOPPING=1"


@pytest.mark.slow
def test_sigterm_mid_event_ends_it_and_exits_0(clips: ClipSet, tmp_path: Path) -> None:
    # live: true on a file loops it forever at 1x: moving bars, an event that never ends alone.
    cfg = write_config(
        tmp_path / "c.yaml", config_for(str(clips.motion.path), free_port(), live=True)
    )
    with DaemonProcess(cfg) as daemon:
        daemon.wait_for_line(r"event new cam")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        new = daemon.wait_for_line(r"event new cam (\S+)")
        end = daemon.wait_for_line(r"event end cam")
        event_id = new.split("event new cam ")[1].split()[0]
        assert event_id in end
        assert daemon.count("streamd stopped") == 1
        assert "Traceback" not in daemon.output


@pytest.mark.slow
def test_second_signal_forces_exit(clips: ClipSet, tmp_path: Path) -> None:
    # A model that takes 20 s per window: a graceful stop would wait for it (up to the budget).
    config = config_for(str(clips.motion.path), free_port(), live=True)
    config["shutdown_timeout_s"] = 60
    cfg = write_config(tmp_path / "c.yaml", config)
    with DaemonProcess(cfg, delay_s=20) as daemon:
        daemon.wait_for_line(r"stream cam: window #2 ")  # window #1 is in the model now
        daemon.signal(signal.SIGINT)
        daemon.wait_for_line(r"received SIGINT: stopping")
        daemon.signal(signal.SIGINT)
        # A forced stop is still a stop that was asked for: 0, never "1 or 0".
        assert daemon.wait(10) == ExitCode.OK
        assert daemon.count("second signal: exiting now") == 1
        assert "Traceback" not in daemon.output


@pytest.mark.slow
def test_model_stall_turns_health_red_starves_the_watchdog_and_exits_1(
    clips: ClipSet, tmp_path: Path
) -> None:
    # The model takes 30 s for a window; model.timeout_s is 2: it stalls, then outlasts it.
    port = free_port()
    config = config_for(str(clips.motion.path), port, live=True)
    config["model"] = {"backend": "motion", "timeout_s": 2}
    cfg = write_config(tmp_path / "c.yaml", config)
    healthz = f"http://127.0.0.1:{port}/healthz"
    with DaemonProcess(cfg, delay_s=30, notify=True, watchdog_usec=1_000_000) as daemon:
        eventually_sync(lambda: get(healthz) == (200, "ok\n"), 15, "healthy")
        eventually_sync(lambda: get(healthz) == (503, "model stalled\n"), 15, "health red")
        assert daemon.wait(15) == ExitCode.FAILURE
        stalled_at = daemon.line_time(r"model stalled: no answer within 2s")
        assert daemon.count(r"model stalled for \d+s: exiting") == 1
        exit_at = daemon.line_time(r"model stalled for")
        assert exit_at - stalled_at >= 2 * 0.9  # it waited out timeout_s once stalled
    pings = [
        at
        for at, note in zip(daemon.notified_at, daemon.notifications, strict=True)
        if note == "WATCHDOG=1"
    ]
    assert pings, daemon.notifications
    assert min(pings) < stalled_at  # it was fed while healthy...
    late = [at - stalled_at for at in pings if at > stalled_at + 0.3]
    assert late == []  # ...and never again once stalled: systemd would restart it


def test_port_taken_exits_3(clips: ClipSet, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", config_for(str(clips.static.path), port))
        with DaemonProcess(cfg) as daemon:
            assert daemon.wait(30) == 3
            line = daemon.wait_for_line("startup failed")
            assert f"http.listen 127.0.0.1:{port}: cannot listen" in line
            assert "Traceback" not in daemon.output


def test_model_failure_exits_3(clips: ClipSet, tmp_path: Path) -> None:
    config = config_for(str(clips.static.path), free_port())
    config["model"] = {"backend": "transformers", "id": str(tmp_path / "missing-model")}
    cfg = write_config(tmp_path / "c.yaml", config)
    with DaemonProcess(cfg) as daemon:
        assert daemon.wait(60) == 3
        line = daemon.wait_for_line("startup failed")
        assert "missing-model" in line
        assert "Traceback" not in daemon.output


def test_unreadable_file_stream_exits_1(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", config_for(str(tmp_path / "nope.mp4"), free_port()))
    with DaemonProcess(cfg) as daemon:
        assert daemon.wait(30) == 1
        assert daemon.count(r"stream cam ended: cannot open .*nope.mp4") == 1
        assert daemon.count("every stream ended; failed: cam") == 1
