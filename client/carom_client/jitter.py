"""A video jitter buffer that releases a frame as soon as its last packet is in (RTP marker bit).

aiortc 1.16's ``JitterBuffer`` knows a frame is complete only when the first packet of the *next*
frame arrives (a change of RTP timestamp). So every frame waits one frame interval in the Python
client (33 ms at 30 fps, 17 ms at 60), and the last frame of a stream is never released at all:
every Python session ended with one frame ``missed`` (measured: 149 of 150 frames due, every
session, in ``./local/run -n 2 -d 5``). Browsers do not wait: RTP senders set the marker bit on a
frame's last packet (RFC 6184 for H.264; aiortc's ``RTCRtpSender`` sets it for every codec), and
Chromium's packet buffer completes a frame on it.

``MarkerJitterBuffer`` completes a frame on its marker packet when every packet from the buffer's
origin up to it is present, and otherwise falls back to aiortc's rule (a timestamp change ends the
previous frame), so a lost marker packet delays a frame instead of losing it. It relies on
``JitterBuffer``'s single-underscore fields (``_origin``, ``_capacity``, ``_packets``) and on the
receiver's private ``_RTCRtpReceiver__jitter_buffer``: ``install`` checks both and fails loudly,
and ``tests/client/test_jitter.py`` pins the behaviour, so an aiortc upgrade cannot silently
change it.
"""

from __future__ import annotations

from typing import Final

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

__all__ = ["MarkerJitterBuffer", "install"]

#: Where aiortc 1.16's RTCRtpReceiver keeps its jitter buffer (created in ``__init__``).
_RECEIVER_BUFFER: Final = "_RTCRtpReceiver__jitter_buffer"
#: aiortc's own size for a video receiver's buffer.
VIDEO_CAPACITY: Final = 512


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, completing frames on the RTP marker bit (module docstring)."""

    def __init__(self, capacity: int = VIDEO_CAPACITY) -> None:
        super().__init__(capacity=capacity, is_video=True)
        for name in ("_origin", "_capacity", "_packets"):
            if not hasattr(self, name):
                raise RuntimeError(
                    f"aiortc's JitterBuffer has no `{name}`: MarkerJitterBuffer was written for "
                    "aiortc 1.16"
                )

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        origin = self._origin
        if origin is None:
            return None
        packets: list[RtpPacket] = []
        timestamp: int | None = None
        for count in range(self._capacity):
            packet = self._packets[(origin + count) % self._capacity]
            if packet is None:
                return None  # a gap: wait for the missing packet (or a later frame's)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                # The previous frame ended without its marker packet: aiortc's own rule.
                return self._take(packets, timestamp, count)
            packets.append(packet)
            if packet.marker:
                return self._take(packets, timestamp, count + 1)
        return None

    def _take(self, packets: list[RtpPacket], timestamp: int, count: int) -> JitterFrame:
        data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]  # set by aiortc
        self.remove(count)
        return JitterFrame(data=data, timestamp=timestamp)


def install(receiver: RTCRtpReceiver) -> MarkerJitterBuffer:
    """Give a video ``RTCRtpReceiver`` a ``MarkerJitterBuffer``; call it before any packet came."""
    current = getattr(receiver, _RECEIVER_BUFFER, None)
    if not isinstance(current, JitterBuffer):
        raise RuntimeError(
            f"this aiortc's RTCRtpReceiver has no {_RECEIVER_BUFFER}: the Python client cannot "
            "complete frames on the marker bit (written for aiortc 1.16)"
        )
    buffer = MarkerJitterBuffer(current.capacity)
    setattr(receiver, _RECEIVER_BUFFER, buffer)
    return buffer
