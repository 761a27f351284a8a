"""WebTransport over HTTP/3 as bytes: what the router's server and the Python client both speak.

Sans-I/O in aioquic's manner: values and bytes in, values and bytes out; no socket, no event loop,
no clock. Both ends of Carom's WebTransport stack (``carom_router.webtransport`` and
``carom_client.webtransport``) are thin aioquic glue around these pieces, so a wire detail is
written once and tested in memory (``tests/runtime/test_webtransport.py``).

aioquic's HTTP/3 layer frames the CONNECT stream's DATA for us, but it does not read the capsules
inside it (RFC 9297 §3.2), nor does it know the WebTransport session close (draft-ietf-webtrans-
http3-02, "Session Termination", the draft Chromium speaks). Those are here, together with the
limits both ends share. Varints are aioquic's own, from its public ``aioquic.buffer`` (an
in-memory byte buffer; ``aioquic._buffer`` is private), so both sides agree with the QUIC stack
byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, NamedTuple

# aioquic.buffer is the public home of these (aioquic's own modules import them from it); it
# re-exports Buffer and BufferReadError from the private _buffer (pyproject.toml tells mypy so).
from aioquic.buffer import (
    UINT_VAR_MAX,
    Buffer,
    BufferReadError,
    encode_uint_var,
)

# --- limits and code points ----------------------------------------------------------------------

#: Capsule type of CLOSE_WEBTRANSPORT_SESSION (draft-ietf-webtrans-http3-02, "Session
#: Termination"; later drafts call it WT_CLOSE_SESSION, same value).
CLOSE_WEBTRANSPORT_SESSION: Final = 0x2843
#: Its Application Error Code is a 32-bit unsigned integer (same section).
MAX_CLOSE_CODE: Final = 0xFFFF_FFFF
#: Its Application Error Message is UTF-8 of at most 1024 bytes (same section).
MAX_CLOSE_MESSAGE: Final = 1024
#: The largest capsule a :class:`CapsuleReader` keeps: a close with the longest message. Larger
#: ones are skipped as they stream past, so a peer cannot make an end buffer them.
MAX_KEPT_CAPSULE: Final = 4 + MAX_CLOSE_MESSAGE

#: Request header by which a client says its extended CONNECT speaks draft-02, as Chromium does
#: (our server does not require it).
DRAFT02_REQUEST_HEADER: Final = (b"sec-webtransport-http3-draft02", b"1")
#: The response header by which a server tells Chromium it speaks draft-02.
DRAFT02_RESPONSE_HEADER: Final = (b"sec-webtransport-http3-draft", b"draft02")

#: HTTP/3 (RFC 9114 §8.1, 0x100-0x110) and QPACK (RFC 9204 §6, 0x200-0x202) error codes, with
#: their reserved neighbours, except H3_NO_ERROR (0x100): a connection closed with one of these
#: was closed for malformed HTTP/3.
HTTP3_ERROR_CODES: Final = range(0x101, 0x300)

#: Largest datagram payload either end sends. aioquic puts a DATAGRAM frame in one 1,200-byte
#: packet: with 8-byte connection IDs 1,169 payload bytes fit and 1,170 never leave (measured,
#: aioquic both ends); a peer's 20-byte connection ID costs 12 more. One that does not fit stays
#: at the head of aioquic's queue and blocks every datagram after it. 1,100 keeps a margin
#: (aioquic#294).
MAX_DATAGRAM_PAYLOAD: Final = 1100
#: Chromium refuses a certificate pinned by hash (``serverCertificateHashes``) that is valid for
#: longer than this (W3C WebTransport, "custom certificate requirements").
MAX_HASH_VALIDITY: Final = timedelta(days=14)
#: UDP socket buffers both ends ask for (the kernel caps them at net.core.rmem_max / wmem_max).
#: The Linux default, about 208 KiB, overflows when a busy loop meets a burst of datagrams.
SOCKET_BUFFER: Final = 4 * 1024 * 1024


class WireError(ValueError):
    """A value the wire format cannot carry, or bytes that do not follow it."""


# --- QUIC variable-length integers (RFC 9000 §16) ------------------------------------------------


def encode_varint(value: int) -> bytes:
    """``value`` as a QUIC varint of the shortest length (1, 2, 4 or 8 bytes)."""
    if not 0 <= value <= UINT_VAR_MAX:
        raise WireError(f"{value} is not a QUIC varint (0 to 2**62-1)")
    return encode_uint_var(value)


def pull_varints(data: bytes, count: int) -> tuple[list[int], int] | None:
    """``count`` varints from the start of ``data``, and the bytes they took.

    None when ``data`` ends inside them: a stream reader keeps the bytes and waits for more.
    Every byte string is a valid varint prefix, so there is nothing else to reject.
    """
    buf = Buffer(data=data)
    try:
        values = [buf.pull_uint_var() for _ in range(count)]
    except BufferReadError:
        return None
    return values, buf.tell()


# --- capsules (RFC 9297 §3.2) --------------------------------------------------------------------


class Capsule(NamedTuple):
    """One capsule: ``Capsule { Type (i), Length (i), Value (..) }`` (RFC 9297 §3.2)."""

    type: int
    value: bytes


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    return encode_varint(capsule_type) + encode_varint(len(value)) + value


@dataclass(frozen=True)
class SessionClose:
    """What a CLOSE_WEBTRANSPORT_SESSION capsule says: why the peer ended the session."""

    code: int
    "Application Error Code, 32 bits."
    message: str
    "Application Error Message; empty when none was given."


def check_close_code(code: int) -> None:
    """Raise :class:`WireError` unless ``code`` fits the close capsule's 32-bit field."""
    if not 0 <= code <= MAX_CLOSE_CODE:
        raise WireError("a WebTransport close code is a 32-bit unsigned integer")


def encode_close(code: int, message: str) -> bytes:
    """A CLOSE_WEBTRANSPORT_SESSION capsule; ``message`` is cut to :data:`MAX_CLOSE_MESSAGE` bytes.

    The cut is by bytes, as the draft counts them; a character split by it is replaced when read.
    """
    check_close_code(code)
    value = code.to_bytes(4, "big") + message.encode()[:MAX_CLOSE_MESSAGE]
    return encode_capsule(CLOSE_WEBTRANSPORT_SESSION, value)


def parse_close(value: bytes) -> SessionClose:
    """The value of a CLOSE_WEBTRANSPORT_SESSION capsule.

    Invalid UTF-8 in the message is replaced rather than refused: the message is for people, and
    the code alone still says how the session ended.
    """
    if len(value) < 4:
        raise WireError(f"a close capsule holds a 4-byte code; this one has {len(value)} bytes")
    if len(value) > MAX_KEPT_CAPSULE:
        raise WireError(f"a close message is at most {MAX_CLOSE_MESSAGE} bytes")
    return SessionClose(int.from_bytes(value[:4], "big"), value[4:].decode("utf-8", "replace"))


def close_reason(side: str, close: SessionClose | None) -> str:
    """How a session's end is told to the application: ``closed by server (code 9: bye)``."""
    if close is None:
        return f"closed by {side}"
    message = f": {close.message}" if close.message else ""
    return f"closed by {side} (code {close.code}{message})"


class CapsuleReader:
    """Capsules on a CONNECT stream, as its DATA arrives in pieces of any size.

    Chromium sends a GREASE capsule, then CLOSE_WEBTRANSPORT_SESSION before its FIN. A capsule
    larger than ``max_kept`` is skipped as it arrives and never stored, so what one peer can make
    this hold is bounded whatever it sends.
    """

    def __init__(self, max_kept: int = MAX_KEPT_CAPSULE) -> None:
        self.close: SessionClose | None = None
        "The first well-formed CLOSE_WEBTRANSPORT_SESSION seen (the draft allows nothing after it)."
        self._max_kept = max_kept
        self._buffer = b""
        self._skip = 0

    def feed(self, data: bytes) -> list[Capsule]:
        """Every capsule that ``data`` completes, in order."""
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        self._buffer += data
        capsules: list[Capsule] = []
        while self._buffer:
            header = pull_varints(self._buffer, 2)
            if header is None:
                break
            (capsule_type, length), start = header
            if length > self._max_kept:
                available = len(self._buffer) - start
                self._skip = max(0, length - available)
                self._buffer = self._buffer[start + min(length, available) :]
                continue
            if len(self._buffer) < start + length:
                break
            capsule = Capsule(capsule_type, self._buffer[start : start + length])
            self._buffer = self._buffer[start + length :]
            capsules.append(capsule)
            if capsule.type == CLOSE_WEBTRANSPORT_SESSION and self.close is None:
                try:
                    self.close = parse_close(capsule.value)
                except WireError:
                    pass  # malformed: the session still ends on FIN, with no code to tell
        return capsules


# --- HTTP fields ---------------------------------------------------------------------------------


def header_map(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header fields as one str -> str map, names lower-case.

    Repeated fields are joined with ", " as HTTP allows (RFC 9110 §5.3); HTTP/3 field names are
    lower-case already (RFC 9114 §4.2), so lowering them changes only a malformed request.
    """
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


# --- aioquic's datagram queue --------------------------------------------------------------------


def datagrams_queued(quic: object) -> int:
    """DATAGRAM frames an aioquic ``QuicConnection`` holds, waiting for congestion-window room.

    aioquic queues them without limit, so both ends refuse new ones past a bound. aioquic 1.7.2
    (pinned in pyproject.toml and requirements.lock) has no public count: it keeps them in the
    private deque ``QuicConnection._datagrams_pending``, and this is the one place Carom reads
    it. A release that renames it makes this 0 (nothing refused for congestion); the unit test
    that queues datagrams on a real ``QuicConnection`` fails first.
    """
    pending: Sequence[bytes] = getattr(quic, "_datagrams_pending", ())
    return len(pending)
