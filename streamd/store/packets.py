"""The packet ring: one stream's demuxed packets, trimmed to whole GOPs by age and by bytes.

Owned by the clip recorder's thread (``streamd.store.clips``); pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

import av
import av.stream

AnyPacket: TypeAlias = "av.Packet[av.stream.Stream]"
EPS_S = 1e-3


@dataclass(slots=True)
class RingEntry:
    """A packet in the ring; ``stream_s`` is the time of its pts (or dts)."""

    packet: AnyPacket
    video: bool
    key: bool
    stream_s: float = 0.0
    seq: int = 0


class PacketRing:
    """Packets in demux order, trimmed to whole GOPs by age and by bytes (recorder thread)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: deque[RingEntry] = deque()
        self.keys: deque[RingEntry] = deque()  # the video keyframes among them
        self.bytes = 0
        self.next_seq = 0

    def append(self, entry: RingEntry) -> None:
        """Add the newest packet; it gets the next ``seq``."""
        entry.seq = self.next_seq
        self.next_seq += 1
        self.entries.append(entry)
        self.bytes += entry.packet.size
        if entry.video and entry.key:
            self.keys.append(entry)

    @property
    def first_seq(self) -> int:
        """``seq`` of the oldest packet held (the next one's when empty)."""
        return self.entries[0].seq if self.entries else self.next_seq

    def get(self, seq: int) -> RingEntry | None:
        """The packet with this ``seq``, if still held."""
        index = seq - self.first_seq
        return self.entries[index] if 0 <= index < len(self.entries) else None

    def start_for(self, target_s: float) -> RingEntry | None:
        """The last keyframe at or before ``target_s``, else the oldest one held."""
        best = self.keys[0] if self.keys else None
        for key in self.keys:
            if key.stream_s > target_s + EPS_S:
                break
            best = key
        return best

    def evict(self, horizon_s: float, keep_from: int) -> int:
        """Drop GOPs older than ``horizon_s`` (not from ``keep_from`` on), then over-bytes ones.

        Returns how many packets went for the byte bound.
        """
        newest = self.entries[-1].stream_s
        while (
            len(self.keys) > 1
            and self.keys[1].stream_s <= newest - horizon_s
            and self.keys[1].seq <= keep_from
        ):
            second = self.keys[1]
            while self.entries[0] is not second:
                self._pop()
        dropped = 0
        # Over the bound, drop from the front until the ring starts at a keyframe again.
        while self.entries and (
            self.bytes > self.max_bytes or (dropped and self.entries[0] is not self._first_key())
        ):
            self._pop()
            dropped += 1
        return dropped

    def clear(self) -> None:
        """Forget every packet (new codec parameters: the old ones are of no use)."""
        self.entries.clear()
        self.keys.clear()
        self.bytes = 0

    def _first_key(self) -> RingEntry | None:
        return self.keys[0] if self.keys else None

    def _pop(self) -> None:
        entry = self.entries.popleft()
        self.bytes -= entry.packet.size
        if self.keys and self.keys[0] is entry:
            self.keys.popleft()
