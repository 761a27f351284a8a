"""Codec choice against real aiortc negotiation, with hand-written Chromium-style offers."""

from __future__ import annotations

import re

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from carom_simulator.codecs import CodecUnavailable, force_codec, offer_codecs
from carom_simulator.track import BallTrack

_SESSION = """v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS
"""

_AUDIO = """m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:Gx2f
a=ice-pwd:mCkGBB1bE4N0rCnEmDV9a5xu
a=ice-options:trickle
a=fingerprint:sha-256 FINGERPRINT
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=recvonly
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
"""

_VIDEO_HEAD = """m=video 9 UDP/TLS/RTP/SAVPF {pts}
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:Gx2f
a=ice-pwd:mCkGBB1bE4N0rCnEmDV9a5xu
a=ice-options:trickle
a=fingerprint:sha-256 FINGERPRINT
a=setup:actpass
a=mid:1
a=extmap:14 urn:ietf:params:rtp-hdrext:toffset
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=recvonly
a=rtcp-mux
a=rtcp-rsize
"""

_VP8 = """a=rtpmap:96 VP8/90000
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 transport-cc
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
"""

_H264 = """a=rtpmap:102 H264/90000
a=rtcp-fb:102 goog-remb
a=rtcp-fb:102 transport-cc
a=rtcp-fb:102 ccm fir
a=rtcp-fb:102 nack
a=rtcp-fb:102 nack pli
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f
a=rtpmap:103 rtx/90000
a=fmtp:103 apt=102
a=rtpmap:104 H264/90000
a=rtcp-fb:104 nack
a=rtcp-fb:104 nack pli
a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f
a=rtpmap:105 rtx/90000
a=fmtp:105 apt=104
"""

_TAIL = """a=rtpmap:45 AV1/90000
a=rtcp-fb:45 nack
a=fmtp:45 level-idx=5;profile=0;tier=0
a=rtpmap:116 red/90000
a=rtpmap:117 ulpfec/90000
"""


_FINGERPRINT = ":".join(["7B", "8B", "F0", "65", "5F", "78", "E2", "51"] * 4)


def _offer(video_pts: str, *codec_blocks: str, audio: bool = True) -> str:
    text = _SESSION + (_AUDIO if audio else "") + _VIDEO_HEAD.format(pts=video_pts)
    text += "".join(codec_blocks)
    if not audio:
        text = text.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 1")
    return text.replace("FINGERPRINT", _FINGERPRINT).replace("\n", "\r\n")


#: What Chromium offers for a recvonly video transceiver (trimmed): VP8, H.264 in both
#: packetization modes, AV1, RED/ULPFEC, each with RTX; plus an audio m-section before it.
CHROMIUM_OFFER = _offer("96 97 102 103 104 105 45 116 117", _VP8, _H264, _TAIL)
VP8_ONLY_OFFER = _offer("96 97", _VP8, audio=False)
H264_HIGH_ONLY_OFFER = _offer(
    "100",
    "a=rtpmap:100 H264/90000\r\n"
    "a=fmtp:100 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f\r\n",
    audio=False,
)


def _answer_video_codecs(sdp: str) -> list[str]:
    """Codec names of the answer's video m-line, in its payload-type order."""
    video = sdp.split("m=video", 1)[1]
    pts = video.splitlines()[0].split()[2:]
    names = dict(re.findall(r"a=rtpmap:(\d+) ([^/]+)/", video))
    return [names[pt].upper() for pt in pts]


async def _answer(offer: str, codec: str | None, *, after: bool = False) -> str:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="sendonly")
        if codec is not None and not after:
            force_codec(transceiver, codec, offer=offer)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        if codec is not None and after:
            # What force_codec refuses to do: aiortc accepts it and silently ignores it.
            caps = [c for c in transceiver.sender.getCapabilities("video").codecs]
            transceiver.setCodecPreferences([c for c in caps if c.name == codec])
        answer = await pc.createAnswer()
        assert answer is not None
        return answer.sdp
    finally:
        await pc.close()


def test_offer_codecs_chromium() -> None:
    assert offer_codecs(CHROMIUM_OFFER) == {"VP8", "RTX", "H264", "AV1", "RED", "ULPFEC"}


def test_offer_codecs_vp8_only_and_garbage() -> None:
    assert offer_codecs(VP8_ONLY_OFFER) == {"VP8", "RTX"}
    assert offer_codecs(VP8_ONLY_OFFER.replace("\r\n", "\n")) == {"VP8", "RTX"}
    assert offer_codecs("") == set()
    assert offer_codecs("not an sdp\nm=video\na=rtpmap:x") == set()
    audio_only = (_SESSION + _AUDIO).replace("FINGERPRINT", _FINGERPRINT)
    assert offer_codecs(audio_only) == set()


@pytest.mark.asyncio
async def test_force_h264_before_remote_description() -> None:
    sdp = await _answer(CHROMIUM_OFFER, "H264")
    codecs = _answer_video_codecs(sdp)
    assert codecs[0] == "H264"
    assert set(codecs) == {"H264", "RTX"}
    # aiortc answers Chromium's packetization-mode=1 payload type with its own profile.
    assert "a=rtpmap:102 H264/90000" in sdp
    assert "packetization-mode=1" in sdp


@pytest.mark.asyncio
async def test_without_forcing_vp8_flows() -> None:
    assert _answer_video_codecs(await _answer(CHROMIUM_OFFER, None))[0] == "VP8"


@pytest.mark.asyncio
async def test_preferences_after_remote_description_are_silently_ignored() -> None:
    """Pins the aiortc 1.16 behaviour force_codec guards against."""
    assert _answer_video_codecs(await _answer(CHROMIUM_OFFER, "H264", after=True))[0] == "VP8"


@pytest.mark.asyncio
async def test_force_codec_refuses_after_negotiation() -> None:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="sendonly")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=CHROMIUM_OFFER, type="offer"))
        with pytest.raises(RuntimeError, match="before"):
            force_codec(transceiver, "H264")
    finally:
        await pc.close()


@pytest.mark.asyncio
async def test_codec_missing_from_offer() -> None:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="sendonly")
        with pytest.raises(CodecUnavailable, match=r"offered: RTX, VP8") as info:
            force_codec(transceiver, "H264", offer=VP8_ONLY_OFFER)
        assert isinstance(info.value, ValueError)
        with pytest.raises(CodecUnavailable, match="packetization-mode=1"):
            force_codec(transceiver, "H264", offer=H264_HIGH_ONLY_OFFER)
        with pytest.raises(CodecUnavailable, match="aiortc sends"):
            force_codec(transceiver, "H265")
        with pytest.raises(CodecUnavailable):
            force_codec(transceiver, "rtx")
        assert transceiver._preferred_codecs == []  # nothing half-applied
    finally:
        await pc.close()


@pytest.mark.asyncio
async def test_force_vp8_with_vp8_only_offer() -> None:
    codecs = _answer_video_codecs(await _answer(VP8_ONLY_OFFER, "vp8"))
    assert set(codecs) == {"VP8", "RTX"}


@pytest.mark.asyncio
async def test_force_codec_with_ball_track_transceiver() -> None:
    """The production call order: addTransceiver(track) -> force_codec -> setRemoteDescription."""
    from concurrent.futures import ThreadPoolExecutor

    from carom_simulator.physics import PhysicsParams

    with ThreadPoolExecutor(1) as executor:
        track = BallTrack("codec", PhysicsParams(), lambda *a: None, executor=executor)
        pc = RTCPeerConnection()
        try:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            force_codec(transceiver, "H264", offer=CHROMIUM_OFFER)
            track.attach_sender(transceiver.sender)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=CHROMIUM_OFFER, type="offer"))
            answer = await pc.createAnswer()
            assert _answer_video_codecs(answer.sdp)[0] == "H264"
        finally:
            track.stop()
            await pc.close()
