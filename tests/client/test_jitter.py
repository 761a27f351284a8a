"""The Python client's marker-bit jitter buffer, fed RTP packets in memory."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from carom_client.jitter import MarkerJitterBuffer, install


def pkt(seq: int, ts: int, data: bytes, marker: bool = False) -> RtpPacket:
    p = RtpPacket(payload_type=102, sequence_number=seq, timestamp=ts)
    p.marker = int(marker)
    p._data = data  # type: ignore[attr-defined]  # what aiortc's receiver sets (depayloaded)
    return p


def test_a_frame_is_released_on_its_marker_packet_not_on_the_next_frame() -> None:
    jb = MarkerJitterBuffer()
    assert jb.add(pkt(100, 3000, b"a")) == (False, None)
    _, frame = jb.add(pkt(101, 3000, b"b", marker=True))
    assert frame is not None and (frame.data, frame.timestamp) == (b"ab", 3000)
    _, last = jb.add(pkt(102, 4500, b"c", marker=True))  # a stream's last frame: released too
    assert last is not None and (last.data, last.timestamp) == (b"c", 4500)


def test_aiortc_alone_holds_every_frame_until_the_next_one_starts() -> None:
    """The behaviour this module exists for; if aiortc changes it, revisit the module."""
    jb = JitterBuffer(capacity=512, is_video=True)
    assert jb.add(pkt(100, 3000, b"a", marker=True))[1] is None
    _, frame = jb.add(pkt(101, 4500, b"b", marker=True))
    assert frame is not None and frame.timestamp == 3000


def test_out_of_order_packets_wait_for_the_gap() -> None:
    jb = MarkerJitterBuffer()
    jb.add(pkt(200, 9000, b"a"))
    assert jb.add(pkt(202, 9000, b"c", marker=True))[1] is None  # 201 still missing
    _, frame = jb.add(pkt(201, 9000, b"b"))
    assert frame is not None and frame.data == b"abc"


def test_a_lost_marker_packet_falls_back_to_the_timestamp_change() -> None:
    jb = MarkerJitterBuffer()
    jb.add(pkt(300, 100, b"x"))
    assert jb.add(pkt(302, 200, b"y"))[1] is None  # 301 missing: the gap holds everything
    jb2 = MarkerJitterBuffer()
    jb2.add(pkt(300, 100, b"x"))
    _, frame = jb2.add(pkt(301, 200, b"y", marker=True))  # no marker on 300's frame
    assert frame is not None and (frame.data, frame.timestamp) == (b"x", 100)
    _, nxt = jb2.add(pkt(302, 300, b"z", marker=True))
    assert nxt is not None and nxt.timestamp == 200


@pytest.mark.asyncio
async def test_install_replaces_a_video_receivers_buffer() -> None:
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        buffer = install(receiver)
        assert isinstance(buffer, MarkerJitterBuffer) and buffer.capacity == 512
        assert vars(receiver)["_RTCRtpReceiver__jitter_buffer"] is buffer
        with pytest.raises(RuntimeError, match=r"aiortc 1\.16"):
            install(object())  # type: ignore[arg-type]
    finally:
        await pc.close()
