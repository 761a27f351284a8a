"""The playout-delay RTP header extension on aiortc's video sender: Carom's interactive mode.

Chromium offers ``http://www.webrtc.org/experiments/rtp-hdrext/playout-delay``. A sender that
answers it and writes ``min = max = 0`` tells the browser to render each frame as soon as it is
decoded instead of holding it in its smoothing buffer. Measured here (shared facts, 2026-12-02)
on a bare aiortc -> Chromium path at 60 fps: frame produced -> report back p50 16.2 -> 7.7 ms and
p99 28.1 -> 13.3 ms; Chromium's jitter-buffer delay per frame 7 -> 0.1 ms. The price: arrival
jitter and CPU spikes reach the screen unsmoothed.

The element (3 bytes, one-byte header form): a 12-bit minimum then a 12-bit maximum delay, both
in 10 ms units (so at most 40,950 ms each).

Stock aiortc 1.16 neither answers nor writes it: its ``HEADER_EXTENSIONS["video"]`` lists only
mid and abs-send-time, so the answer drops the offered extension, and its
``HeaderExtensionsMap`` knows no such element. :func:`install` fixes that for ONE transceiver,
never process-wide:

- it adds the offered extension (the offer's id) to the transceiver's negotiated header
  extensions after ``setRemoteDescription`` and before ``createAnswer``, so the answer lists it
  and the sender's parameters carry its id;
- it replaces the sender's header-extension map with :class:`PlayoutDelayMap`, which writes the
  element on every video packet (RTX too) while a delay is set.

Every packet, not just keyframes: Chromium keeps the last value it saw, and keyframes alone were
enough in the measurement, but a change of mode mid-session then waits for the next keyframe
(up to 10 s with Carom's GOP) and one lost keyframe packet loses it; 4 bytes per ~1,200-byte
packet is the whole cost.

It relies on three private details of aiortc (pinned in requirements.lock at 1.16.0):
``RTCRtpTransceiver._headerExtensions``, ``RTCRtpSender.__rtp_header_extensions_map`` (name
mangled) and ``HeaderExtensionsMap.set`` returning ``pack_header_extensions``'s output.
:func:`install` checks the first two and raises :class:`PlayoutUnsupported` when they are gone,
:func:`check_answer` fails loudly when an answer that should list the extension does not, and
tests/simulator/test_playout.py sends real RTP through a real aiortc sender and reads the element
back off the wire.
"""

from __future__ import annotations

import re
from typing import Any, Final

from aiortc import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import (
    HeaderExtensions,
    HeaderExtensionsMap,
    pack_header_extensions,
    unpack_header_extensions,
)

__all__ = [
    "MAX_DELAY_MS",
    "RECEIVER_DEFAULT_MS",
    "URI",
    "PlayoutDelayMap",
    "PlayoutUnsupported",
    "check_answer",
    "decode_element",
    "encode_element",
    "install",
    "offered_id",
]

URI: Final = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
UNIT_MS: Final = 10
"""The element counts in 10 ms units."""
MAX_DELAY_MS: Final = 0xFFF * UNIT_MS
"""The largest delay the 12-bit fields hold: 40,950 ms."""
RECEIVER_DEFAULT_MS: Final = (0, 10_000)
"""The bounds a libwebrtc receiver uses when no element was ever seen (``VCMTiming``: min 0,
max 10 s): what going back to ``smooth`` writes, since the browser keeps the last value."""

_SENDER_MAP: Final = "_RTCRtpSender__rtp_header_extensions_map"
_EXTMAP = re.compile(r"^a=extmap:(\d+)(?:/\w+)?\s+(\S+)", re.IGNORECASE)


class PlayoutUnsupported(RuntimeError):
    """The installed aiortc lacks what this module relies on (an upgrade changed its internals)."""


def encode_element(min_ms: int, max_ms: int) -> bytes:
    """The 3-byte element for ``min_ms``..``max_ms`` (multiples of 10, 0 <= min <= max <= 40950)."""
    for name, ms in (("min", min_ms), ("max", max_ms)):
        if not 0 <= ms <= MAX_DELAY_MS or ms % UNIT_MS:
            raise ValueError(f"playout delay {name} {ms} ms: must be a multiple of 10 in 0..40950")
    if min_ms > max_ms:
        raise ValueError(f"playout delay min {min_ms} ms above max {max_ms} ms")
    packed = (min_ms // UNIT_MS) << 12 | (max_ms // UNIT_MS)
    return packed.to_bytes(3, "big")


def decode_element(data: bytes) -> tuple[int, int]:
    """``(min_ms, max_ms)`` from a 3-byte element (what a receiver reads)."""
    if len(data) != 3:
        raise ValueError(f"a playout-delay element is 3 bytes, got {len(data)}")
    packed = int.from_bytes(data, "big")
    return (packed >> 12) * UNIT_MS, (packed & 0xFFF) * UNIT_MS


def offered_id(sdp: str, mid: str | None = None) -> int | None:
    """The extension id a video m-section of the offer gives playout-delay, or None.

    ``mid``: the m-section to read (the transceiver's); None reads the first video m-section.
    Never raises on malformed text (the offer comes from an untrusted client). Ids outside the
    one-byte form's 1..14 are refused: this module writes only the one-byte form.
    """
    in_video = False
    section_mid: str | None = None
    found: int | None = None
    for raw in [*sdp.splitlines(), "m=end"]:
        line = raw.strip()
        if line.startswith("m="):
            if in_video and (mid is None or section_mid == mid):
                return found
            in_video = line[2:].split(" ", 1)[0].lower() == "video"
            section_mid, found = None, None
            continue
        if not in_video:
            continue
        if line.startswith("a=mid:"):
            section_mid = line[6:].strip()
            continue
        m = _EXTMAP.match(line)
        if m and m.group(2) == URI:
            ext_id = int(m.group(1))
            found = ext_id if 1 <= ext_id <= 14 else None
    return None


class PlayoutDelayMap(HeaderExtensionsMap):
    """aiortc's header-extension map plus the playout-delay element, per sender.

    ``delay_ms``: ``(min, max)`` to write on every packet, or None to write nothing (the
    browser's own smoothing). It may change at any time; the next packet carries the new value.
    """

    def __init__(self, delay_ms: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.ext_id: int | None = None
        self._element: bytes | None = None
        self.delay_ms = delay_ms

    @property
    def delay_ms(self) -> tuple[int, int] | None:
        return self._delay

    @delay_ms.setter
    def delay_ms(self, value: tuple[int, int] | None) -> None:
        self._element = None if value is None else encode_element(*value)
        self._delay = value

    def switch(self, value: tuple[int, int] | None) -> None:
        """Change the delay of a running session from the next packet.

        ``None`` (``smooth``) once a delay was written writes :data:`RECEIVER_DEFAULT_MS`
        instead of nothing: Chromium keeps the last value it saw, so a sender that fell silent
        would leave the browser in the mode it was leaving.
        """
        if value is None and self._delay is not None:
            value = RECEIVER_DEFAULT_MS
        self.delay_ms = value

    @property
    def writing(self) -> bool:
        """True when packets carry the element (negotiated and a delay set)."""
        return self.ext_id is not None and self._element is not None

    def configure(self, parameters: RTCRtpParameters) -> None:
        super().configure(parameters)
        for ext in parameters.headerExtensions:
            if ext.uri == URI:
                self.ext_id = ext.id

    def set(self, values: HeaderExtensions) -> tuple[int, bytes]:
        profile, packed = super().set(values)
        if self.ext_id is None or self._element is None:
            return profile, packed
        elements = unpack_header_extensions(profile, packed) if packed else []
        elements.append((self.ext_id, self._element))
        return pack_header_extensions(elements)


def install(
    transceiver: Any, offer_sdp: str, delay_ms: tuple[int, int] | None
) -> PlayoutDelayMap | None:
    """Answer playout-delay on ``transceiver`` if the offer has it; the sender's map, or None.

    Call after ``pc.setRemoteDescription(offer)`` and before ``pc.createAnswer()``. None when the
    offer does not list the extension (nothing is changed, the browser smooths as usual). The map
    starts writing ``delay_ms`` (None: negotiated, nothing written until a delay is set).
    """
    ext_id = offered_id(offer_sdp, getattr(transceiver, "mid", None))
    if ext_id is None:
        return None
    negotiated = getattr(transceiver, "_headerExtensions", None)
    sender = transceiver.sender
    if not isinstance(negotiated, list) or not isinstance(
        getattr(sender, _SENDER_MAP, None), HeaderExtensionsMap
    ):
        raise PlayoutUnsupported(
            "this aiortc has no RTCRtpTransceiver._headerExtensions list or "
            "RTCRtpSender.__rtp_header_extensions_map: carom_simulator.playout needs aiortc 1.16"
        )
    if any(e.id == ext_id and e.uri != URI for e in negotiated):
        return None  # the offer reuses the id for another negotiated extension: not answerable
    if not any(e.uri == URI for e in negotiated):
        negotiated.append(RTCRtpHeaderExtensionParameters(id=ext_id, uri=URI))
    playout = PlayoutDelayMap(delay_ms)
    setattr(sender, _SENDER_MAP, playout)
    return playout


def check_answer(answer_sdp: str, playout: PlayoutDelayMap | None) -> None:
    """Raise PlayoutUnsupported if the extension was installed but the answer does not list it."""
    if playout is not None and offered_id(answer_sdp) is None:
        raise PlayoutUnsupported(
            "the answer does not list the playout-delay extension although it was installed: "
            "aiortc no longer builds answers from RTCRtpTransceiver._headerExtensions"
        )
