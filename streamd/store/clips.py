"""Event clips: demuxed packets kept per stream and remuxed, never re-encoded, to fragmented MP4.

PyAVSource hands every demuxed packet to ``on_packet`` on its decode thread and the pipeline
calls ``begin`` / ``extend`` / ``end`` on the event loop. Both only append to one queue that the
recorder's own thread drains: it owns the packet ring and the files, so a slow disk holds up
neither decoding nor the loop. The queue holds at most ``QUEUE_PACKETS`` packets; a full queue
drops the packet (``clip_packets_dropped{reason="queue_full"}``) and video resumes at the next
keyframe. Control calls bypass that bound, like the frame ring's markers.

Time is stream seconds, the clock of frames, windows and events. A clip runs from the keyframe
at or before ``start - pre_roll_s`` to the last packet before ``end + post_roll_s``, with
timestamps ``stream_s - origin`` (its first keyframe): it starts at 0 and audio stays in sync.
Packets are written as soon as the event's known extent (its start, then each ``extend``, plus
the post-roll) covers them, so the file grows while the event runs; it is fragmented MP4,
flushed at each fragment (every keyframe, at least every ``FRAGMENT_S``), so a kill -9 leaves a
clip that plays up to its last fragment.

Reconnects: a connection with the same codec parameters as the last (codec, size, pixel
format, extradata, time base, audio) continues open clips, with a gap in time where the source
was away; other parameters end them there (``complete=False``) and empty the ring. A clip whose
event has ended is cut short (``complete=False``) when the source goes away before its post-roll
arrives; one whose event still runs waits for the source to come back.

Packets without a time (before a live connection's first timestamped frame; the first RTSP
keyframe has neither pts nor dts) wait, ``UNPLACED_MAX`` at most, for the next timed packet:
then each is placed by its own timestamp with that packet's offset, or, without one, one frame
period before the next packet of its kind, as ``Timeline`` places untimed frames.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import av.audio.stream
import av.container
import av.error
import av.stream
import av.video.frame
import av.video.stream
from PIL import Image

from streamd.metrics import Metrics
from streamd.store.packets import EPS_S, AnyPacket, PacketRing, RingEntry

logger = logging.getLogger(__name__)

CLIP_ID = re.compile(r"[0-9]+\.[0-9]+-[a-z0-9_-]+-[0-9]+")
"""Event ids, the only names clip files get (no path can be smuggled in)."""
QUEUE_PACKETS = 2048
"""Packets waiting for the recorder thread (~25 s of 1080p30 with audio)."""
EVENT_LAG_S = 30.0
"""``begin`` comes after the event's first windows were scored: history kept on top of the
pre-roll, so the pre-roll is still in the ring when it does."""
UNPLACED_MAX = 256
FRAGMENT_S = 2.0
MP4_OPTIONS = {
    "movflags": "frag_keyframe+empty_moov+delay_moov+default_base_moof",
    "frag_duration": str(int(FRAGMENT_S * 1e6)),
    "flush_packets": "1",  # each fragment reaches the file when it is complete
}
JPEG_QUALITY = 85
DROP_REASONS = ("queue_full", "ring_bytes", "resync", "untimed", "write_error")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
_ERRNO_REASONS = dict.fromkeys(_FULL, "no_space") | dict.fromkeys(_DENIED, "not_writable")

ClipDone = Callable[[str, Path, int, bool], None]
"""``(event_id, path, size_bytes, complete)``, on the recorder thread, once per ``begin``."""


def snapshot_jpeg(frame: av.video.frame.VideoFrame, quality: int = JPEG_QUALITY) -> bytes:
    """The frame at its own resolution as a JPEG (PIL: ~11 ms at 1080p, ~5 ms at 720p here)."""
    buffer = io.BytesIO()
    Image.fromarray(frame.to_ndarray(format="rgb24")).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class _Templates:
    """One connection's codec parameters, copied out of its container (which closes first)."""

    holder: av.container.OutputContainer  # owns the copies; never started, never written
    video: av.video.stream.VideoStream
    audio: av.audio.stream.AudioStream | None
    signature: tuple[object, ...]
    frame_s: float


def _templates(
    video: av.video.stream.VideoStream, audio: av.audio.stream.AudioStream | None, stream: str
) -> _Templates:
    holder = av.open(os.devnull, "w", format="mp4")  # also checks MP4 can hold the codec
    video_copy = holder.add_stream_from_template(video, opaque=True)
    audio_copy = None
    if audio is not None:
        try:
            audio_copy = holder.add_stream_from_template(audio, opaque=True)
        except ValueError:
            logger.info("stream %s: clips without audio (%s is not for MP4)", stream, audio.name)
    v = video_copy.codec_context
    signature: tuple[object, ...] = (v.name, v.width, v.height, v.pix_fmt, v.extradata)
    signature += (video_copy.time_base,)
    if audio_copy is not None:
        a = audio_copy.codec_context
        signature += (a.name, a.sample_rate, a.layout.name, a.extradata, audio_copy.time_base)
    rate = video.average_rate or video.guessed_rate or Fraction(25)
    return _Templates(holder, video_copy, audio_copy, signature, 1 / float(rate))


@dataclass(frozen=True, slots=True)
class _Arrival:
    packet: AnyPacket
    stream_s: float | None
    video: bool
    gap: bool  # packets were dropped just before this one


@dataclass(frozen=True, slots=True)
class _Connect:
    templates: _Templates | None


@dataclass(frozen=True, slots=True)
class _Command:
    op: Literal["begin", "extend", "end", "disconnect", "stop"]
    event_id: str = ""
    time_s: float = 0.0


_Item = _Arrival | _Connect | _Command


@dataclass(slots=True)
class _Clip:
    event_id: str
    path: Path
    target_s: float  # the clip starts at the keyframe at or before this
    until_s: float  # packets before this are written: the known end plus the post-roll
    ended: bool = False
    output: av.container.OutputContainer | None = None
    opened: bool = False  # a file was created
    video: av.video.stream.VideoStream | None = None
    audio: av.audio.stream.AudioStream | None = None
    cursor: int = 0  # ring seq of the next packet to write
    origin_s: float = 0.0
    last_s: float = 0.0
    need_key: bool = False
    last_dts: dict[bool, int] = field(default_factory=dict)  # by "is video"


class ClipRecorder:
    """One stream's event clips, written by a thread of its own.

    Args:
        stream: Stream name (metric label, log lines).
        clips_dir: Where ``<event_id>.mp4`` files go; created on the first clip.
        pre_roll_s: Video kept before an event's start (back to a keyframe).
        post_roll_s: And after its end.
        metrics: Instruments (``clip_*``), children bound to ``stream``.
        on_done: Called on the recorder thread once per ``begin`` when its file is closed:
            ``complete`` is False when cut short (stop, source lost, error); size 0 means no
            file was written (the stream delivered nothing for it, or the disk refused it).
        max_ring_bytes: Bound on the packets kept for pre-rolls.
    """

    def __init__(
        self,
        stream: str,
        clips_dir: Path,
        pre_roll_s: float,
        post_roll_s: float,
        metrics: Metrics,
        on_done: ClipDone | None = None,
        max_ring_bytes: int = 64 * 2**20,
    ) -> None:
        self.stream = stream
        self.clips_dir = clips_dir
        self.pre_roll_s = pre_roll_s
        self.post_roll_s = post_roll_s
        self._on_done = on_done
        self._metrics = metrics
        self._ring_gauge = metrics.clip_ring_bytes.labels(stream=stream)
        self._drops = {
            r: metrics.clip_packets_dropped.labels(stream=stream, reason=r) for r in DROP_REASONS
        }
        self._finished = metrics.clips.labels(stream=stream)
        self._cond = threading.Condition()  # guards the four fields below
        self._items: deque[_Item] = deque()
        self._queued_packets = 0
        self._gap = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._indexes = (-1, -1)  # decode thread: (video, audio) stream index
        # Recorder thread only:
        self._ring = PacketRing(max_ring_bytes)
        self._clips: dict[str, _Clip] = {}
        self._templates: _Templates | None = None
        self._connected = False
        self._await_key = True
        self._unplaced: list[RingEntry] = []

    def clip_path(self, event_id: str) -> Path:
        """Where an event's clip goes; ValueError for an id that is not an event id."""
        if not CLIP_ID.fullmatch(event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        return self.clips_dir / f"{event_id}.mp4"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the recorder thread."""
        self._thread = threading.Thread(
            target=self._run, name=f"streamd[{self.stream}].clips", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float) -> None:
        """Finish open clips (complete only if their post-roll was written) and stop the thread."""
        self._push(_Command("stop"))
        with self._cond:
            self._closed = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("stream %s: clip writer busy after %.1fs", self.stream, timeout)

    # --- decode thread -----------------------------------------------------------------------

    def on_connect(
        self,
        container: av.container.InputContainer,
        video_stream: av.video.stream.VideoStream,
        audio_stream: av.audio.stream.AudioStream | None,
    ) -> None:
        """A new connection: copy its codec parameters (cheap, once per connection)."""
        templates = None
        try:
            templates = _templates(video_stream, audio_stream, self.stream)
        except (ValueError, av.error.FFmpegError) as exc:
            logger.warning(
                "stream %s: no clips from this %s: %s", self.stream, container.format.name, exc
            )
        self._indexes = (-1, -1)  # without templates, no packet is queued
        if templates is not None:
            has_audio = audio_stream is not None and templates.audio is not None
            audio = audio_stream.index if audio_stream is not None and has_audio else -1
            self._indexes = (video_stream.index, audio)
        self._push(_Connect(templates))

    def on_packet(self, packet: AnyPacket, stream_s: float | None) -> None:
        """A demuxed packet and the stream time of its pts (None when not known yet)."""
        video_index, audio_index = self._indexes
        video = packet.stream_index == video_index
        if not packet.size or not (video or packet.stream_index == audio_index):
            return
        with self._cond:
            if self._closed:
                return
            full = self._queued_packets >= QUEUE_PACKETS
            if not full:
                self._items.append(_Arrival(packet, stream_s, video, self._gap))
                self._queued_packets += 1
                self._cond.notify()
            self._gap = full
        if full:
            self._drops["queue_full"].inc()

    def on_disconnect(self) -> None:
        """The connection is gone (lost, ended or stopped; not a looped file's restart)."""
        self._push(_Command("disconnect"))

    # --- event loop ---------------------------------------------------------------------------

    def begin(self, event_id: str, start_s: float) -> Path:
        """Start an event's clip; returns its path. ValueError for a malformed id."""
        path = self.clip_path(event_id)
        self._push(_Command("begin", event_id, start_s))
        return path

    def extend(self, event_id: str, end_s: float) -> None:
        """The event runs at least until ``end_s``: write up to there plus the post-roll."""
        self._push(_Command("extend", event_id, end_s))

    def end(self, event_id: str, end_s: float) -> None:
        """The event ended at ``end_s``: close the clip once ``end_s + post_roll_s`` is written."""
        self._push(_Command("end", event_id, end_s))

    def _push(self, item: _Item) -> None:
        with self._cond:
            if not self._closed:
                self._items.append(item)
                self._cond.notify()

    # --- recorder thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
                if isinstance(item, _Arrival):
                    self._queued_packets -= 1
            if isinstance(item, _Command) and item.op == "stop":
                self._stop()
                return
            self._handle(item)

    def _handle(self, item: _Item) -> None:
        if isinstance(item, _Arrival):
            self._arrive(item)
        elif isinstance(item, _Connect):
            self._connect(item.templates)
        elif item.op == "disconnect":
            self._disconnect()
        else:
            self._command(item)

    def _command(self, command: _Command) -> None:
        event_id, time_s = command.event_id, command.time_s
        clip = self._clips.get(event_id)
        if command.op == "begin":
            if clip is None:
                clip = _Clip(event_id, self.clip_path(event_id), time_s - self.pre_roll_s, time_s)
                clip.until_s = time_s + self.post_roll_s
                self._clips[event_id] = clip
                self._advance(clip)
            return
        if clip is None:
            logger.debug("stream %s: %s for no clip: %s", self.stream, command.op, event_id)
            return
        clip.until_s = max(clip.until_s, time_s + self.post_roll_s)
        clip.ended = clip.ended or command.op == "end"
        self._advance(clip)
        if clip.ended and not self._connected and event_id in self._clips:
            self._finish(clip, complete=False)

    def _connect(self, templates: _Templates | None) -> None:
        old = self._templates
        if old is not None and (templates is None or templates.signature != old.signature):
            logger.info("stream %s: new codec parameters: open clips end here", self.stream)
            for clip in [c for c in self._clips.values() if c.output is not None]:
                self._finish(clip, complete=False)
            self._ring.clear()
            self._ring_gauge.set(0)
        self._templates = templates
        self._connected = True
        self._await_key = True
        self._drop_unplaced()

    def _disconnect(self) -> None:
        self._connected = False
        self._drop_unplaced()
        for clip in [c for c in self._clips.values() if c.ended]:
            self._finish(clip, complete=False)

    def _stop(self) -> None:
        for clip in list(self._clips.values()):
            self._finish(clip, complete=False)

    def _drop_unplaced(self) -> None:
        if self._unplaced:
            self._drops["untimed"].inc(len(self._unplaced))
            self._unplaced.clear()

    def _arrive(self, arrival: _Arrival) -> None:
        templates = self._templates
        if templates is None:
            return
        key = arrival.packet.is_keyframe
        self._await_key = self._await_key or arrival.gap
        if arrival.video:
            if self._await_key and not key:  # undecodable without the packets before it
                self._drops["resync"].inc()
                return
            self._await_key = False
        entry = RingEntry(arrival.packet, arrival.video, key)
        if arrival.stream_s is None:
            if len(self._unplaced) >= UNPLACED_MAX:
                self._unplaced.pop(0)
                self._drops["untimed"].inc()
            self._unplaced.append(entry)
            return
        entry.stream_s = arrival.stream_s
        if self._unplaced:
            self._place_unplaced(entry, templates.frame_s)
        self._ring.append(entry)
        open_cursors = [c.cursor for c in self._clips.values() if c.output is not None]
        keep_from = min(open_cursors, default=self._ring.next_seq)
        dropped = self._ring.evict(self.pre_roll_s + EVENT_LAG_S, keep_from)
        if dropped:
            self._drops["ring_bytes"].inc(dropped)
        self._ring_gauge.set(self._ring.bytes)
        for clip in list(self._clips.values()):
            self._advance(clip)

    def _place_unplaced(self, timed: RingEntry, frame_s: float) -> None:
        time_s = _packet_time(timed.packet)
        offset = None if time_s is None else timed.stream_s - time_s
        following = {timed.video: timed.stream_s}
        for entry in reversed(self._unplaced):
            own = _packet_time(entry.packet)
            if own is not None and offset is not None:
                entry.stream_s = own + offset
            else:
                step = _duration_s(entry.packet) if not entry.video else 0.0
                entry.stream_s = following.get(entry.video, timed.stream_s) - (step or frame_s)
            following[entry.video] = entry.stream_s
        for entry in self._unplaced:
            self._ring.append(entry)
        self._unplaced.clear()

    def _advance(self, clip: _Clip) -> None:
        """Open the clip once its start is in the ring, write what is due, close it when done."""
        try:
            if clip.output is None and not self._open(clip):
                return
            self._write(clip)
        except (OSError, av.error.FFmpegError, ValueError) as exc:
            self._fail(clip, exc)

    def _open(self, clip: _Clip) -> bool:
        templates, ring = self._templates, self._ring
        if templates is None or not ring.entries or ring.entries[-1].stream_s < clip.target_s:
            return False
        start = ring.start_for(clip.target_s)
        if start is None:
            return False  # no keyframe yet
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        output = av.open(str(clip.path), "w", format="mp4", container_options=MP4_OPTIONS)
        clip.output, clip.opened = output, True  # from here on, _finish closes it
        clip.video = output.add_stream_from_template(templates.video, opaque=True)
        if templates.audio is not None:
            clip.audio = output.add_stream_from_template(templates.audio, opaque=True)
        output.start_encoding()  # the file and its header exist from the start
        clip.cursor, clip.origin_s = start.seq, start.stream_s
        logger.debug("stream %s: clip %s from %.2fs", self.stream, clip.event_id, start.stream_s)
        return True

    def _write(self, clip: _Clip) -> None:
        if clip.cursor < self._ring.first_seq:  # evicted for bytes before it was written
            clip.cursor, clip.need_key = self._ring.first_seq, True
        while (entry := self._ring.get(clip.cursor)) is not None:
            if entry.stream_s >= clip.until_s - EPS_S:
                if clip.ended:
                    self._finish(clip, complete=True)
                return
            clip.cursor += 1
            self._mux(clip, entry)

    def _mux(self, clip: _Clip, entry: RingEntry) -> None:
        if entry.video and clip.need_key and not entry.key:
            return
        stream = clip.video if entry.video else clip.audio
        source = entry.packet
        if stream is None or clip.output is None:
            return
        ticks = round((entry.stream_s - clip.origin_s) / source.time_base)
        if ticks < 0 and not entry.video:
            return  # audio from before the first keyframe
        delta = source.pts - source.dts if source.pts is not None and source.dts is not None else 0
        dts = ticks - delta  # B-frames keep their reordering
        last = clip.last_dts.get(entry.video)
        if last is not None and dts <= last:
            dts = last + 1
        packet = av.Packet(bytes(source))
        packet.pts, packet.dts, packet.time_base = max(ticks, dts), dts, source.time_base
        packet.duration = source.duration or 0
        packet.is_keyframe = entry.key
        packet.stream = stream
        clip.output.mux(packet)
        clip.last_dts[entry.video] = dts
        clip.need_key = clip.need_key and not entry.video
        clip.last_s = max(clip.last_s, entry.stream_s)

    def _fail(self, clip: _Clip, exc: BaseException) -> None:
        reason = _error_reason(exc)
        self._metrics.clip_errors.labels(stream=self.stream, reason=reason).inc()
        self._drops["write_error"].inc()
        logger.error(
            "stream %s: clip %s stopped, cannot write: %s", self.stream, clip.event_id, exc
        )
        self._finish(clip, complete=False, failed=True)

    def _finish(self, clip: _Clip, *, complete: bool, failed: bool = False) -> None:
        self._clips.pop(clip.event_id, None)
        output, clip.output = clip.output, None
        if output is not None:
            try:
                output.close()  # writes the last fragment
            except (OSError, av.error.FFmpegError) as exc:
                if not failed:
                    self._fail(clip, exc)  # comes back here with failed=True
                    return
        try:
            size = clip.path.stat().st_size if clip.opened else 0
        except OSError:
            size = 0
        if not failed:
            self._finished.inc()
        how = "complete" if complete else "cut short"
        length_s = max(0.0, clip.last_s - clip.origin_s)
        logger.info(
            "stream %s: clip %s %s: %.1fs, %dB", self.stream, clip.event_id, how, length_s, size
        )
        if self._on_done is not None:
            try:
                self._on_done(clip.event_id, clip.path, size, complete)
            except Exception:  # the caller's bug must not end the clips of this stream
                logger.exception("stream %s: clip %s: on_done failed", self.stream, clip.event_id)


def _packet_time(packet: AnyPacket) -> float | None:
    ticks = packet.pts if packet.pts is not None else packet.dts
    return None if ticks is None else float(ticks * packet.time_base)


def _duration_s(packet: AnyPacket) -> float:
    return float(packet.duration * packet.time_base) if packet.duration else 0.0


def _error_reason(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in _ERRNO_REASONS:
        return _ERRNO_REASONS[code]
    return "io" if isinstance(exc, OSError) else "mux"
