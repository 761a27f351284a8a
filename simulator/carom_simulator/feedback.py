"""What a receiver's RTCP feedback asks of the sender (pure): WebRTC's reaction to a bad network.

A receiver that misses packets sends NACKs listing their sequence numbers (the sender resends
the ones it still holds); one that cannot decode asks for a keyframe with a PLI (or an older
FIR); both show how the stream repaired itself on an emulated network (``carom.impairment``),
beside the frames the tracker saw arrive late or never. The track counts them per phase
(``carom.schemas.PhaseSummary``: ``nacks``, ``retransmitted``, ``keyframe_requests``).
"""

from __future__ import annotations

from typing import NamedTuple

from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
)


class Feedback(NamedTuple):
    """One RTCP packet's requests: NACK packets, sequence numbers they ask for, keyframe asks."""

    nacks: int = 0
    asked: int = 0
    keyframe_requests: int = 0


NONE = Feedback()


def feedback(packet: object) -> Feedback:
    """What ``packet`` (one parsed RTCP packet, as aiortc hands it to its sender) asks for."""
    if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
        return Feedback(nacks=1, asked=len(packet.lost))
    if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
        return Feedback(keyframe_requests=1)
    return NONE
