"""The receiver's RTCP feedback, as the sender counts it (NACKs, keyframe requests)."""

from __future__ import annotations

from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
)

from carom_simulator.feedback import NONE, Feedback, feedback


def _parsed(packet: object) -> object:
    """The packet as aiortc's DTLS transport hands it to the sender: serialised, parsed."""
    [out] = RtcpPacket.parse(packet.__bytes__())  # type: ignore[attr-defined]
    return out


def test_a_nack_counts_once_with_each_sequence_number_it_asks_for() -> None:
    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=2, lost=[10, 11, 15, 40])
    assert feedback(_parsed(nack)) == Feedback(nacks=1, asked=4)


def test_pli_and_fir_are_keyframe_requests() -> None:
    for fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
        pkt = RtcpPsfbPacket(fmt=fmt, ssrc=1, media_ssrc=2, fci=b"" if fmt == RTCP_PSFB_PLI else
                             b"\x00\x00\x00\x02\x01\x00\x00\x00")  # fmt: skip
        assert feedback(_parsed(pkt)) == Feedback(keyframe_requests=1)


def test_receiver_reports_and_remb_ask_for_nothing() -> None:
    assert feedback(_parsed(RtcpRrPacket(ssrc=1))) is NONE
    remb = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=b"REMB\x01\x03\x00\x00")
    assert feedback(remb) is NONE
