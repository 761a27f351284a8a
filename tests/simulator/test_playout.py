"""The playout-delay extension: the 3-byte element, the answer, and real RTP off a real sender."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiortc import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensions, RtpPacket, unpack_header_extensions

from carom.schemas import MAX_PLAYOUT_MS, playout_delay
from carom.signaling import OfferRequest, SessionControl, SessionParams
from carom_client.video import DecodedFrame, VideoClient
from carom_runtime.ice import set_host_addresses
from carom_simulator import playout
from carom_simulator.config import SimulatorSettings
from carom_simulator.origin import Stamped
from carom_simulator.playout import (
    RECEIVER_DEFAULT_MS,
    URI,
    PlayoutDelayMap,
    decode_element,
    encode_element,
    offered_id,
)
from carom_simulator.sessions import SessionError, SessionManager
from tests.services import wait_until_async

# The video m-section of a Chromium 156 offer, trimmed (extension ids as Chromium numbers them).
CHROMIUM_VIDEO = """m=video 9 UDP/TLS/RTP/SAVPF 96 97
c=IN IP4 0.0.0.0
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:toffset
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=extmap:6 http://www.webrtc.org/experiments/rtp-hdrext/playout-delay
a=extmap:7 http://www.webrtc.org/experiments/rtp-hdrext/video-content-type
a=recvonly
a=rtpmap:96 H264/90000
"""


# --- the element -------------------------------------------------------------------------------


def test_element_is_two_12_bit_fields_in_10_ms_units() -> None:
    assert encode_element(0, 0) == b"\x00\x00\x00"
    assert encode_element(100, 200) == bytes([0x00, 0xA0, 0x14])  # 10 << 12 | 20
    assert encode_element(40950, 40950) == b"\xff\xff\xff"
    for lo, hi in [(0, 0), (0, 100), (10, 10), (120, 40950)]:
        assert decode_element(encode_element(lo, hi)) == (lo, hi)


@pytest.mark.parametrize(("lo", "hi"), [(5, 10), (0, 7), (20, 10), (-10, 0), (0, 40960)])
def test_element_refuses_what_it_cannot_say(lo: int, hi: int) -> None:
    with pytest.raises(ValueError):
        encode_element(lo, hi)


def test_the_modes_bound_is_the_elements() -> None:
    assert MAX_PLAYOUT_MS == playout.MAX_DELAY_MS  # one limit, written twice: kept equal here
    delay = playout_delay(f"0-{MAX_PLAYOUT_MS}")
    assert delay is not None and decode_element(encode_element(*delay)) == delay


def test_decode_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError):
        decode_element(b"\x00\x00")


# --- the offer ---------------------------------------------------------------------------------


def test_offered_id_reads_the_video_section() -> None:
    sdp = "v=0\r\n" + CHROMIUM_VIDEO.replace("\n", "\r\n")
    assert offered_id(sdp) == 6
    assert offered_id(sdp, "0") == 6
    assert offered_id(sdp, "1") is None  # no such m-section


def test_offered_id_ignores_audio_and_other_sections() -> None:
    audio = "m=audio 9 UDP/TLS/RTP/SAVPF 111\na=mid:a\na=extmap:6 " + URI + "\n"
    assert offered_id("v=0\n" + audio) is None
    both = "v=0\n" + audio + CHROMIUM_VIDEO.replace("a=extmap:6", "a=extmap:9")
    assert offered_id(both) == 9
    assert offered_id(both, "a") is None


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "m=video\na=extmap:x " + URI, "m=video 9 X 96\na=extmap:15 " + URI,
     "m=video 9 X 96\na=extmap:0 " + URI],
)  # fmt: skip
def test_offered_id_never_raises_and_refuses_ids_outside_the_one_byte_form(text: str) -> None:
    assert offered_id(text) is None


def test_offered_id_accepts_a_direction() -> None:
    assert offered_id("m=video 9 X 96\na=extmap:3/recvonly " + URI + "\n") == 3


# --- the map: what every packet carries ------------------------------------------------------


def _extensions(packet_bytes: bytes) -> dict[int, bytes]:
    """The header-extension elements of one serialized RTP packet, by id."""
    assert packet_bytes[0] & 0x10, "no header extension"
    csrc = packet_bytes[0] & 0x0F
    at = 12 + 4 * csrc
    profile, words = struct.unpack_from("!HH", packet_bytes, at)
    value = packet_bytes[at + 4 : at + 4 + 4 * words]
    return dict(unpack_header_extensions(profile, value))


def _map(delay: tuple[int, int] | None, ext_id: int | None = 9) -> PlayoutDelayMap:
    m = PlayoutDelayMap(delay)
    exts = [
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        RTCRtpHeaderExtensionParameters(
            id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
        ),
    ]
    if ext_id is not None:
        exts.append(RTCRtpHeaderExtensionParameters(id=ext_id, uri=URI))
    m.configure(RTCRtpParameters(headerExtensions=exts))
    return m


def _packet() -> RtpPacket:
    p = RtpPacket(payload_type=96, sequence_number=1, timestamp=1234, ssrc=5, payload=b"x" * 50)
    p.extensions = HeaderExtensions(mid="0", abs_send_time=0x123456)
    return p


def test_map_appends_the_element_beside_aiortcs_own() -> None:
    m = _map((0, 0))
    assert m.writing
    ext = _extensions(_packet().serialize(m))
    assert ext == {1: b"0", 3: b"\x12\x34\x56", 9: b"\x00\x00\x00"}
    m.delay_ms = (0, 100)  # a change reaches the next packet
    assert decode_element(_extensions(_packet().serialize(m))[9]) == (0, 100)


def test_map_writes_nothing_without_a_delay_or_without_negotiation() -> None:
    for m in (_map(None), _map((0, 0), ext_id=None)):
        assert not m.writing
        assert set(_extensions(_packet().serialize(m))) == {1, 3}


def test_map_adds_the_element_to_a_packet_with_no_other_extension() -> None:
    m = PlayoutDelayMap((0, 0))
    m.configure(RTCRtpParameters(headerExtensions=[RTCRtpHeaderExtensionParameters(id=4, uri=URI)]))
    p = RtpPacket(payload_type=96, sequence_number=1, timestamp=1, ssrc=5, payload=b"x")
    assert _extensions(p.serialize(m)) == {4: b"\x00\x00\x00"}
    assert RtpPacket.parse(p.serialize(m)).payload == b"x"  # still a valid packet


# --- a real negotiation and real RTP -----------------------------------------------------------


@pytest.fixture
def loopback() -> Iterator[None]:
    set_host_addresses(["127.0.0.1"])
    yield
    set_host_addresses(["auto"])


def _offer_playout(sdp: str, ext_id: int = 9) -> str:
    """The Python client's offer with the extension Chromium offers (aiortc's lacks it)."""
    lines = sdp.split("\r\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("a=mid:"))
    lines.insert(at + 1, f"a=extmap:{ext_id} {URI}")
    return "\r\n".join(lines)


async def _stream(
    latency: str | None, *, offer_extension: bool
) -> tuple[str, list[bytes], list[tuple[str, Stamped]], SessionManager]:
    """One 60 fps session straight from a SessionManager; its answer, raw RTP and truths."""
    executor = ThreadPoolExecutor(1)
    truths: list[tuple[str, Stamped]] = []
    manager = SessionManager(SimulatorSettings(), lambda *row: truths.append(row), executor)
    frames: list[DecodedFrame] = []
    client = VideoClient(frames.append)
    raw: list[bytes] = []
    try:
        offer = await client.offer()
        if offer_extension:
            offer = _offer_playout(offer)
        answer = await manager.create(
            OfferRequest(session_id="p1", sdp=offer, params=SessionParams(fps=60, latency=latency))
        )
        await client.accept(answer.sdp)
        dtls = client.pc.getTransceivers()[0].receiver.transport
        handle = dtls._handle_rtp_data

        async def spy(data: bytes, arrival_time_ms: int) -> None:
            raw.append(data)  # decrypted RTP, as the receiver got it
            await handle(data, arrival_time_ms)

        dtls._handle_rtp_data = spy  # type: ignore[method-assign]
        await wait_until_async(lambda: len(frames) >= 20, "20 frames decoded", 5, every=0.05)
        assert len(frames) >= 20
        assert answer.params.latency is not None
        return answer.sdp + f"\nlatency={answer.params.latency}", raw, truths, manager
    finally:
        await manager.close_all()
        await client.close()
        executor.shutdown(wait=True)


def _video_rtp(raw: list[bytes]) -> list[bytes]:
    return [p for p in raw if len(p) > 12 and (p[1] & 0x7F) not in range(72, 77)]


@pytest.mark.asyncio
async def test_interactive_session_answers_and_writes_zero_delay_on_every_packet(
    loopback: None,
) -> None:
    answer, raw, truths, _ = await _stream("interactive", offer_extension=True)
    assert f"a=extmap:9 {URI}" in answer
    assert answer.endswith("latency=interactive")
    packets = _video_rtp(raw)
    assert len(packets) >= 20
    assert all(_extensions(p).get(9) == b"\x00\x00\x00" for p in packets)
    assert truths and {row[1].truth.latency for row in truths} == {"interactive"}


@pytest.mark.asyncio
async def test_explicit_bounds_are_written_as_asked(loopback: None) -> None:
    answer, raw, truths, _ = await _stream("0-100", offer_extension=True)
    assert answer.endswith("latency=0-100")
    assert {decode_element(_extensions(p)[9]) for p in _video_rtp(raw)} == {(0, 100)}
    assert {row[1].truth.latency for row in truths} == {"0-100"}


@pytest.mark.asyncio
async def test_smooth_session_negotiates_but_writes_nothing(loopback: None) -> None:
    answer, raw, truths, _ = await _stream("smooth", offer_extension=True)
    assert f"a=extmap:9 {URI}" in answer  # answered: the mode can change later
    assert all(9 not in _extensions(p) for p in _video_rtp(raw))
    assert {row[1].truth.latency for row in truths} == {"smooth"}


@pytest.mark.asyncio
async def test_an_offer_without_the_extension_gets_smooth_and_says_so(loopback: None) -> None:
    answer, raw, truths, manager = await _stream("interactive", offer_extension=False)
    assert URI not in answer
    assert answer.endswith("latency=smooth")  # the mode in force, not the one asked for
    assert all(len(_extensions(p)) <= 2 for p in _video_rtp(raw))
    assert {row[1].truth.latency for row in truths} == {"smooth"}
    assert manager.counters["playout_not_offered"] == 1


def test_going_back_to_smooth_writes_the_receivers_defaults() -> None:
    """Chromium keeps the last element it saw: silence after 0/0 would leave it interactive."""
    m = _map(None)
    m.switch(None)
    assert m.delay_ms is None  # never written: stay silent, the browser's own default
    m.switch((0, 0))
    m.switch(None)
    assert m.delay_ms == RECEIVER_DEFAULT_MS == (0, 10_000)
    m.switch((0, 100))
    assert m.delay_ms == (0, 100)


async def _decoded_more(frames: list[DecodedFrame], n: int) -> None:
    want = len(frames) + n
    await wait_until_async(lambda: len(frames) >= want, f"{n} more frames", 10, every=0.02)


def _rtp_ts(packet: bytes) -> int:
    return int(struct.unpack_from("!I", packet, 4)[0])


@pytest.mark.asyncio
async def test_latency_changes_live_on_the_wire_in_every_label_and_phase(loopback: None) -> None:
    """smooth -> interactive -> smooth -> 0-100 on one running session: each frame's packets carry
    its phase's element (at most the last frame before a switch, already in the encoder, carries
    the next one), its truth is labelled with its phase's mode, and each phase records it."""
    executor = ThreadPoolExecutor(1)
    truths: list[tuple[str, Stamped]] = []
    manager = SessionManager(SimulatorSettings(), lambda *row: truths.append(row), executor)
    frames: list[DecodedFrame] = []
    client = VideoClient(frames.append)
    raw: list[bytes] = []
    modes = ["smooth", "interactive", "smooth", "0-100"]
    try:
        offer = _offer_playout(await client.offer())
        answer = await manager.create(
            OfferRequest(session_id="p1", sdp=offer, params=SessionParams(fps=60))
        )
        await client.accept(answer.sdp)
        dtls = client.pc.getTransceivers()[0].receiver.transport
        handle = dtls._handle_rtp_data

        async def spy(data: bytes, arrival_time_ms: int) -> None:
            raw.append(data)
            await handle(data, arrival_time_ms)

        dtls._handle_rtp_data = spy  # type: ignore[method-assign]
        for i, mode in enumerate(modes):
            if i:
                state = await manager.control("p1", SessionControl(latency=mode))
                assert (state.phase, state.params.latency) == (i, mode)
            await _decoded_more(frames, 15)
        phases = manager._sessions["p1"].track.phases()
    finally:
        await manager.close_all()
        await client.close()
        executor.shutdown(wait=True)
    assert [(p.phase, p.latency) for p in phases] == list(enumerate(modes))
    # Per phase: smooth writes nothing until a delay was written, then the receiver's defaults.
    expected: list[tuple[int, int] | None] = [None, (0, 0), RECEIVER_DEFAULT_MS, (0, 100)]
    by_ts: dict[int, set[tuple[int, int] | None]] = {}
    for packet in _video_rtp(raw):
        element = _extensions(packet).get(9)
        by_ts.setdefault(_rtp_ts(packet), set()).add(
            None if element is None else decode_element(element)
        )
    last_of_phase = {st.truth.phase: st.truth.frame for _, st in truths}
    checked = 0
    for _, stamped in truths:
        t = stamped.truth
        assert t.latency == modes[t.phase]
        seen = by_ts.get(stamped.rtp_ts)
        if not seen:
            continue  # not captured (sent before the spy, or after the close)
        checked += 1
        allowed = {expected[t.phase]}
        if t.frame == last_of_phase[t.phase] and t.phase + 1 < len(expected):
            allowed.add(expected[t.phase + 1])  # in the encoder when the switch came
        assert seen <= allowed and len(seen) == 1, (t, seen)
    assert checked >= 50, checked


@pytest.mark.asyncio
async def test_a_live_latency_without_the_extension_is_refused(loopback: None) -> None:
    """A browser that did not offer the extension cannot be switched: 409, and nothing changes."""
    executor = ThreadPoolExecutor(1)
    manager = SessionManager(SimulatorSettings(), lambda *row: None, executor)
    frames: list[DecodedFrame] = []
    client = VideoClient(frames.append)
    try:
        answer = await manager.create(
            OfferRequest(session_id="p1", sdp=await client.offer(), params=SessionParams(fps=30))
        )
        await client.accept(answer.sdp)
        with pytest.raises(SessionError) as refused:
            await manager.control("p1", SessionControl(latency="interactive"))
        assert refused.value.status == 409 and "playout-delay" in refused.value.detail
        assert manager._sessions["p1"].track.phase == 0
        state = await manager.control("p1", SessionControl(latency="smooth"))  # a no-op, allowed
        assert state.params.latency == "smooth"
    finally:
        await manager.close_all()
        await client.close()
        executor.shutdown(wait=True)


def test_install_fails_loudly_when_aiortc_changed() -> None:
    class Sender:
        pass

    class Transceiver:
        def __init__(self) -> None:
            self.mid = "0"
            self.sender = Sender()
            self._headerExtensions: list[object] = []

    sdp = "v=0\n" + CHROMIUM_VIDEO
    with pytest.raises(playout.PlayoutUnsupported):
        playout.install(Transceiver(), sdp, (0, 0))
    assert playout.install(Transceiver(), "v=0\nm=video 9 X 96\na=mid:0\n", (0, 0)) is None
    with pytest.raises(playout.PlayoutUnsupported):
        playout.check_answer("v=0\nm=video 9 X 96\n", PlayoutDelayMap((0, 0)))
