"""A GStreamer RTSP server for tests; run it with Debian's /usr/bin/python3 (it has `gi`).

    /usr/bin/python3 tests/rtsp_server.py --port 0 --file clip.mp4    # H.264 mp4, ends with EOS
    /usr/bin/python3 tests/rtsp_server.py --port 0 --live --pattern ball

Serves rtsp://127.0.0.1:PORT/live and prints `READY rtsp://127.0.0.1:PORT/live` (flushed) once
it listens; `--port 0` picks a free port. SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

MOUNT = "/live"


def launch_line(args: argparse.Namespace) -> str:
    pay = "rtph264pay name=pay0 pt=96 config-interval=1"
    if args.file:
        # gst-launch syntax: a double-quoted string with backslash escapes.
        location = '"' + args.file.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"( filesrc location={location} ! qtdemux ! h264parse ! {pay} )"
    caps = f"video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1"
    return (
        f"( videotestsrc is-live=true pattern={args.pattern} ! {caps} ! "
        f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.key_int} ! {pay} )"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="an H.264 .mp4 to serve (plays once per session)")
    source.add_argument("--live", action="store_true", help="an endless videotestsrc")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--pattern", default="ball", help="videotestsrc pattern (ball, black...)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--key-int", type=int, default=10, help="keyframe interval, frames")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.file and not os.path.isfile(args.file):
        sys.stderr.write(f"ERROR no such file: {args.file}\n")  # else: 503 on each connect
        return 2
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args))
    factory.set_shared(True)  # several clients watch one pipeline, like a camera
    server.get_mount_points().add_factory(MOUNT, factory)
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        sys.stderr.write(f"ERROR cannot listen on 127.0.0.1:{args.port}\n")
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, _quit, loop)
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}{MOUNT}", flush=True)  # noqa: T201
    loop.run()
    return 0


def _quit(loop: GLib.MainLoop) -> bool:
    loop.quit()
    return GLib.SOURCE_REMOVE  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
