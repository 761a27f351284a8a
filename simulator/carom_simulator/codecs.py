"""Choose the video codec aiortc sends, and check an SDP offer can receive it.

aiortc 1.16 negotiates VP8 unless told otherwise, and the only lever is
``RTCRtpTransceiver.setCodecPreferences``. It takes effect only if called BEFORE
``setRemoteDescription(offer)``: that call computes the transceiver's codec list once, from the
preferences in force at that moment, and the answer is built from that list. Called after, it is
silently ignored and VP8 flows (measured against Chromium 156). ``force_codec`` therefore refuses
to run on a transceiver that has already negotiated.

H.264 is the codec Carom wants: its RTP timestamps are exactly ``origin + pts`` for every frame,
whereas VP8's were measured off by a tick on some frames. aiortc can send only
H.264 with ``packetization-mode=1`` and the constrained-baseline profile; an offer whose H.264
variants are all something else (High profile only, mode 0 only) cannot be answered with H.264,
so ``force_codec(..., offer=sdp)`` reports that as ``CodecUnavailable`` instead of letting
``setRemoteDescription`` fail later with aiortc's ``OperationError``.
"""

from __future__ import annotations

import re
from typing import Any

from aiortc import RTCRtpCodecParameters, RTCRtpSender
from aiortc.codecs import CODECS
from aiortc.rtcpeerconnection import is_codec_compatible

__all__ = ["CodecUnavailable", "force_codec", "offer_codecs"]

_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([^/\s]+)/(\d+)", re.IGNORECASE)
_FMTP = re.compile(r"^a=fmtp:(\d+) (.*)$", re.IGNORECASE)


class CodecUnavailable(ValueError):
    """The codec cannot be used for this session (the offer lacks it, or aiortc cannot send it)."""


class _VideoCodec:
    """One payload type of a video m-section: what ``is_codec_compatible`` needs."""

    __slots__ = ("clock_rate", "name", "parameters", "payload_type")

    def __init__(self, payload_type: int, name: str, clock_rate: int) -> None:
        self.payload_type = payload_type
        self.name = name
        self.clock_rate = clock_rate
        self.parameters: dict[str, str] = {}


def _video_codecs(sdp: str) -> list[_VideoCodec]:
    """Every codec of every video m-section, in offer order. Never raises on malformed text.

    A hand parser rather than aiortc's: the offer comes from an untrusted client, and aiortc's
    parser raises assorted exceptions on text it does not like, which the caller would then have
    to tell apart from real codec problems.
    """
    codecs: list[_VideoCodec] = []
    in_video = False
    section: dict[int, _VideoCodec] = {}
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            in_video = line[2:].split(" ", 1)[0].lower() == "video"
            section = {}
            continue
        if not in_video:
            continue
        m = _RTPMAP.match(line)
        if m:
            codec = _VideoCodec(int(m.group(1)), m.group(2).upper(), int(m.group(3)))
            section[codec.payload_type] = codec
            codecs.append(codec)
            continue
        m = _FMTP.match(line)
        if m and int(m.group(1)) in section:
            for item in m.group(2).split(";"):
                key, sep, value = item.strip().partition("=")
                if sep:
                    section[int(m.group(1))].parameters[key.strip().lower()] = value.strip()
    return codecs


def offer_codecs(sdp: str) -> set[str]:
    """Upper-case names of the video codecs an SDP offers, e.g. ``{"VP8", "H264", "RTX"}``.

    Empty when the SDP has no video m-section (or is not SDP at all).
    """
    return {c.name for c in _video_codecs(sdp)}


def _sendable(codec: _VideoCodec) -> bool:
    """True if aiortc would accept this offered codec for sending (its own compatibility rule)."""
    remote = RTCRtpCodecParameters(
        mimeType=f"video/{codec.name}",
        clockRate=codec.clock_rate,
        payloadType=codec.payload_type,
        parameters=dict(codec.parameters),
    )
    local: list[Any] = CODECS["video"]
    return any(is_codec_compatible(c, remote) for c in local)


def force_codec(transceiver: Any, name: str, *, offer: str | None = None) -> None:
    """Make ``transceiver`` send only ``name`` (plus RTX for retransmissions).

    MUST be called before ``pc.setRemoteDescription(offer)``; afterwards aiortc silently ignores
    codec preferences, so this raises ``RuntimeError`` on a transceiver that has negotiated.
    Raises ``CodecUnavailable`` when aiortc cannot send ``name`` or, if ``offer`` (the SDP text)
    is given, when the offer has no variant of it that aiortc can send.
    """
    wanted = name.upper()
    if getattr(transceiver, "_codecs", None):
        raise RuntimeError(
            "force_codec called after negotiation: aiortc ignores codec preferences set after "
            "setRemoteDescription, call it before"
        )
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    chosen = [c for c in capabilities if c.name.upper() == wanted and wanted != "RTX"]
    if not chosen:
        sendable = sorted({c.name.upper() for c in capabilities} - {"RTX"})
        raise CodecUnavailable(f"cannot send {name!r} video (aiortc sends {', '.join(sendable)})")
    if offer is not None:
        offered = [c for c in _video_codecs(offer) if c.name == wanted]
        if not offered:
            names = sorted(offer_codecs(offer))
            raise CodecUnavailable(
                f"the offer cannot receive {wanted} video (offered: {', '.join(names) or 'none'})"
            )
        if not any(_sendable(c) for c in offered):
            raise CodecUnavailable(
                f"the offer's {wanted} variants are not ones aiortc can send "
                "(H264 needs packetization-mode=1 and a constrained-baseline profile-level-id)"
            )
    rtx = [c for c in capabilities if c.name.upper() == "RTX"]
    transceiver.setCodecPreferences(chosen + rtx)
