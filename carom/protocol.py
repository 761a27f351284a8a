"""Carom's WebTransport session protocol: message formats, codecs and pure helpers.

Shared by the router and the Python clients (the page implements the same in JavaScript). No I/O
and no clock of its own (callers pass times in), so every rule here is unit-tested in memory. The
protocol is written down in docs/protocol.md.

Control messages travel on one client-opened bidirectional stream as frames: a 4-byte big-endian
length, then that many bytes of UTF-8 JSON, an object with a ``type``. Centroid reports and live
error results travel as fixed-layout binary datagrams (big-endian, the default of JS DataView).
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from carom.schemas import MAX_FRAME_SIDE, FrameResult, SessionId
from carom.signaling import SessionControl, SessionParams, StreamState

PROTOCOL_VERSION: Final = 1
#: Largest control frame accepted (an SDP offer is ~3-10 kB).
MAX_CONTROL_BYTES: Final = 64 * 1024
#: Largest first frame (the hello) accepted: a hello with every field at its longest is under
#: 1 KiB, so a client cannot make the router buffer 64 KiB before it has said who it is.
MAX_HELLO_BYTES: Final = 4096
#: Datagrams above about one QUIC packet are silently not sent by aioquic; stay well below.
MAX_DATAGRAM_BYTES: Final = 1100

#: WebTransport close codes (CLOSE_WEBTRANSPORT_SESSION) the router ends a session with. A fatal
#: ``error`` message says which rule was broken before the session closes with one of them.
CLOSE_NORMAL: Final = 0
"The session ended as the protocol says (``bye``, ``end``, the router shutting down)."
CLOSE_PROTOCOL_ERROR: Final = 1
"A fatal protocol error (``expected_hello``, ``oversize``, ``hello_timeout``, ...)."
CLOSE_TOO_MANY_ERRORS: Final = 2
"The client kept sending bad or unexpected control messages; closed to protect the others."

#: What a ``status`` message may be about: the parts a session depends on beyond the router.
StatusPart = Literal["broker", "tracker", "simulator"]
STATUS_PARTS: Final[tuple[StatusPart, ...]] = ("broker", "tracker", "simulator")

# --- control messages ----------------------------------------------------------------------------


class _Control(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    pass


class Hello(_Control, tag="hello", frozen=True, kw_only=True):
    """First client message: which session this is, and its physics/video parameters."""

    session_id: SessionId
    protocol: Literal[1] = PROTOCOL_VERSION
    params: SessionParams = msgspec.field(default_factory=SessionParams)
    #: Free text shown in the router's logs and metrics labels (e.g. "chromium", "py-client").
    client: Annotated[str, Meta(max_length=64)] = ""


class Offer(_Control, tag="offer", frozen=True, kw_only=True):
    sdp: Annotated[str, Meta(min_length=10, max_length=60_000)]


class Pong(_Control, tag="pong", frozen=True, kw_only=True):
    """Reply to a router ping: the client's clock when it read the ping."""

    id: Annotated[int, Meta(ge=0, le=2**31)]
    t_client_ms: Annotated[float, Meta(ge=0, le=1e14)]


class BrowserStats(_Control, tag="stats", frozen=True, kw_only=True):
    """Periodic WebRTC receiver stats from the page (getStats), forwarded to the metrics."""

    fps: Annotated[float, Meta(ge=0, le=1000)] | None = None
    jitter_buffer_ms: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    decode_ms: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    frames_decoded: Annotated[int, Meta(ge=0)] | None = None
    frames_dropped: Annotated[int, Meta(ge=0)] | None = None
    codec: Annotated[str, Meta(max_length=64)] | None = None
    frames_received: Annotated[int, Meta(ge=0)] | None = None
    freeze_count: Annotated[int, Meta(ge=0)] | None = None
    freezes_ms: Annotated[float, Meta(ge=0, le=1e12)] | None = None
    bytes_received: Annotated[int, Meta(ge=0)] | None = None
    width: Annotated[int, Meta(ge=1, le=MAX_FRAME_SIDE)] | None = None
    height: Annotated[int, Meta(ge=1, le=MAX_FRAME_SIDE)] | None = None
    jitter_buffer_delay_s: Annotated[float, Meta(ge=0, le=1e9)] | None = None
    jitter_buffer_emitted: Annotated[int, Meta(ge=0)] | None = None


class Control(_Control, tag="control", frozen=True, kw_only=True):
    """Change the running session: stop or resume its stream, or set parameters live.

    The router relays ``set`` to the simulator (``PATCH /sessions/{id}``) and answers with a
    ``control_ack`` carrying the same ``id``. One control at a time per session: a second one
    sent before the first's ack is refused (``busy``).
    """

    id: Annotated[int, Meta(ge=0, le=2**31)]
    set: SessionControl


class Bye(_Control, tag="bye", frozen=True, kw_only=True):
    pass


class Welcome(_Control, tag="welcome", frozen=True, kw_only=True):
    session_id: str
    protocol: int = PROTOCOL_VERSION
    max_report_rate: float
    max_datagram_bytes: int = MAX_DATAGRAM_BYTES


class Answer(_Control, tag="answer", frozen=True, kw_only=True):
    """The router's control message to the client: the answer to its ``Offer``.

    Not the simulator's HTTP body ``carom.signaling.Answer``, which the router relays from: this
    one carries its ``sdp``, ``codec`` and ``params`` (no session id: the stream is the session).
    """

    sdp: str
    codec: str
    params: SessionParams
    #: Why this session's L2 figures may be wrong (``carom.signaling.Answer.warning``).
    warning: Annotated[str, Meta(max_length=500)] = ""


class ControlAck(_Control, tag="control_ack", frozen=True, kw_only=True):
    """The outcome of the client's ``control`` with the same ``id``.

    ``ok``: the change is in force from the next frame, in phase ``phase``, with ``params`` and
    ``state``. Otherwise ``error`` says why (an invalid value names its field; ``busy``: another
    control is still in flight) and nothing changed.
    """

    id: int
    ok: bool
    state: StreamState | None = None
    phase: int | None = None
    params: SessionParams | None = None
    error: Annotated[str, Meta(max_length=500)] = ""
    #: Why the new phase's L2 figures may be wrong (``carom.signaling.SessionState.warning``).
    warning: Annotated[str, Meta(max_length=500)] = ""


class Ping(_Control, tag="ping", frozen=True, kw_only=True):
    id: int
    t_server_ns: int


class ClockEstimate(_Control, tag="clock", frozen=True, kw_only=True):
    """The router's current estimate, sent so the page can show it (server - client)."""

    offset_ms: float
    rtt_ms: float


class End(_Control, tag="end", frozen=True, kw_only=True):
    """The session's last message: after the client's ``bye``, or when the video stopped.

    ``complete``: every frame due has had its result sent (the tracker said so), and
    ``frames_due`` frames were due (frames ``0 .. frames_due-1``); a client that counts its
    results by status then has the same counts as the tracker's CSV (docs/accounting.md).
    False when the router stopped waiting (``frames_due`` is then None).
    """

    complete: bool
    frames_due: Annotated[int, Meta(ge=0)] | None = None
    #: Empty after the client's ``bye``. Otherwise the simulator ended the stream on its own
    #: (e.g. ``connect timeout``, ``peer failed``, ``shutdown``): without this the client would
    #: only see its video freeze.
    reason: Annotated[str, Meta(max_length=200)] = ""


class Status(_Control, tag="status", frozen=True, kw_only=True):
    """A part the session depends on is ``degraded``, or has ``recovered``.

    Sent to every open session when it changes, and at hello for each part degraded then, so a
    client can tell a broker outage or a silent tracker (live results pause, then arrive late)
    from a fault of its own. ``detail`` is a sentence for people.
    """

    state: Literal["degraded", "recovered"]
    part: StatusPart
    detail: Annotated[str, Meta(max_length=300)] = ""


class Error(_Control, tag="error", frozen=True, kw_only=True):
    code: str
    message: str
    #: True when the router closes the session after this message.
    fatal: bool = False


ClientMessage = Hello | Offer | Pong | BrowserStats | Control | Bye
RouterMessage = Welcome | Answer | ControlAck | Ping | ClockEstimate | End | Error | Status

_client_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)
_router_decoder: msgspec.json.Decoder[RouterMessage] = msgspec.json.Decoder(RouterMessage)
_encoder = msgspec.json.Encoder()
_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """A peer broke the protocol; ``code`` is the short reason used in counters and errors."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(msg: ClientMessage | RouterMessage) -> bytes:
    """One control message as a length-prefixed frame."""
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Incremental reader of length-prefixed control frames (a stream may split them anywhere).

    ``max_bytes`` may change between frames (the router allows a small hello, then any frame up
    to :data:`MAX_CONTROL_BYTES`). ``push`` + ``next`` take frames one at a time, so a reader can
    stop in the middle of a chunk (a session closed after its tenth bad message does not parse
    the 40,000 behind it).
    """

    def __init__(self, max_bytes: int = MAX_CONTROL_BYTES) -> None:
        self._buf = bytearray()
        self.max_bytes = max_bytes

    def push(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> bytes | None:
        """The next complete frame body, or None; raises on a frame over ``max_bytes``."""
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > self.max_bytes:
            raise ProtocolError("oversize", f"control message of {n} bytes (max {self.max_bytes})")
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        return body

    def feed(self, data: bytes) -> list[bytes]:
        """Complete frame bodies in ``data`` (plus what was buffered); raises on an oversize one."""
        self.push(data)
        out: list[bytes] = []
        while (body := self.next()) is not None:
            out.append(body)
        return out

    def clear(self) -> None:
        """Drop what is buffered (the session is over)."""
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)


def parse_client(body: bytes) -> ClientMessage:
    try:
        return _client_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter as is
        raise ProtocolError("bad_message", f"invalid control message: {exc}") from None


def parse_router(body: bytes) -> RouterMessage:
    try:
        return _router_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter as is
        raise ProtocolError("bad_message", f"invalid router message: {exc}") from None


# --- datagrams -----------------------------------------------------------------------------------

KIND_REPORT: Final = 1
KIND_ERROR: Final = 2
FLAG_DETECTED: Final = 1

#: version u8, kind u8, flags u16, seq u32, rtp_ts u32, x f32, y f32,
#: t_recv_ms f64, t_analysed_ms f64 (client clock, epoch ms; NaN when unknown).
REPORT: Final = struct.Struct(">BBHIIffdd")
#: version u8, kind u8, status u8, pad u8, rtp_ts u32, frame u32, truth_x f32, truth_y f32,
#: x f32, y f32, l2 f32, render_to_router_ms f32, render_to_computed_ms f32 (NaN when unknown).
ERROR: Final = struct.Struct(">BBBxIIfffffff")
_STATUS_CODES: Final = {"ok": 0, "not_detected": 1, "missed": 2, "not_sent": 3}
_STATUS_NAMES: Final = {v: k for k, v in _STATUS_CODES.items()}


@dataclass(frozen=True, slots=True)
class Report:
    """A decoded, range-checked centroid report, times still on the client's clock."""

    seq: int
    rtp_ts: int
    detected: bool
    x: float | None
    y: float | None
    t_recv_ms: float | None
    t_analysed_ms: float | None


def encode_report(
    seq: int,
    rtp_ts: int,
    centroid: tuple[float, float] | None,
    t_recv_ms: float | None,
    t_analysed_ms: float | None,
) -> bytes:
    x, y = centroid if centroid is not None else (math.nan, math.nan)
    return REPORT.pack(
        PROTOCOL_VERSION,
        KIND_REPORT,
        FLAG_DETECTED if centroid is not None else 0,
        seq & 0xFFFFFFFF,
        rtp_ts,
        x,
        y,
        math.nan if t_recv_ms is None else t_recv_ms,
        math.nan if t_analysed_ms is None else t_analysed_ms,
    )


def decode_report(data: bytes) -> Report:
    """Parse and range-check one report datagram; ``ProtocolError.code`` says why it was bad."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise ProtocolError("oversize", f"datagram of {len(data)} bytes")
    if len(data) < 2:
        raise ProtocolError("truncated", f"datagram of {len(data)} bytes")
    if data[0] != PROTOCOL_VERSION:
        raise ProtocolError("version", f"datagram version {data[0]}, expected {PROTOCOL_VERSION}")
    if data[1] != KIND_REPORT:
        raise ProtocolError("kind", f"datagram kind {data[1]} is not a report")
    if len(data) != REPORT.size:
        code = "truncated" if len(data) < REPORT.size else "length"
        raise ProtocolError(code, f"report of {len(data)} bytes, expected {REPORT.size}")
    _, _, flags, seq, rtp_ts, x, y, t_recv, t_an = REPORT.unpack(data)
    if flags & ~FLAG_DETECTED:
        raise ProtocolError("flags", f"unknown report flags {flags:#x}")
    detected = bool(flags & FLAG_DETECTED)
    if detected:
        for v in (x, y):
            if not math.isfinite(v):
                raise ProtocolError("nan", "report position is not a finite number")
            if not 0.0 <= v <= MAX_FRAME_SIDE:
                raise ProtocolError("range", f"report position {v} outside 0..{MAX_FRAME_SIDE}")
    elif not (math.isnan(x) and math.isnan(y)):
        raise ProtocolError("range", "a report without a detection must carry NaN positions")
    times: list[float | None] = []
    for t in (t_recv, t_an):
        if math.isnan(t):
            times.append(None)
        elif not math.isfinite(t) or not 0.0 < t < 1e14:
            raise ProtocolError("time", f"report timestamp {t} is not a plausible epoch ms")
        else:
            times.append(t)
    return Report(
        seq, rtp_ts, detected, x if detected else None, y if detected else None, times[0], times[1]
    )


def encode_result(result: FrameResult) -> bytes:
    """A frame's live result (its L2 error and latencies) as the compact datagram the page draws."""

    def ms(a: int | None, b: int | None) -> float:
        return math.nan if a is None or b is None else (b - a) / 1e6

    def f(v: float | None) -> float:
        return math.nan if v is None else v

    return ERROR.pack(
        PROTOCOL_VERSION,
        KIND_ERROR,
        _STATUS_CODES[result.status],
        result.rtp_ts,
        result.frame & 0xFFFFFFFF,
        f(result.truth_x),
        f(result.truth_y),
        f(result.x),
        f(result.y),
        f(result.l2),
        ms(result.t_render_ns, result.t_router_recv_ns),
        ms(result.t_render_ns, result.t_computed_ns),
    )


@dataclass(frozen=True, slots=True)
class LiveResult:
    """A decoded result datagram (what the page and the Python client show)."""

    rtp_ts: int
    frame: int
    status: str
    truth_x: float | None
    "None only for a frame not sent."
    truth_y: float | None
    x: float | None
    y: float | None
    l2: float | None
    render_to_router_ms: float | None
    render_to_computed_ms: float | None


def decode_result(data: bytes) -> LiveResult:
    if len(data) != ERROR.size or data[0] != PROTOCOL_VERSION or data[1] != KIND_ERROR:
        raise ProtocolError("bad_error_datagram", f"not an error datagram ({len(data)} bytes)")
    _, _, status, rtp_ts, frame_no, tx, ty, x, y, l2, e2e, total = ERROR.unpack(data)
    if status not in _STATUS_NAMES:
        raise ProtocolError("bad_error_datagram", f"unknown status {status}")

    def opt(v: float) -> float | None:
        return None if math.isnan(v) else v

    return LiveResult(
        rtp_ts, frame_no, _STATUS_NAMES[status], opt(tx), opt(ty), opt(x), opt(y), opt(l2),
        opt(e2e), opt(total),
    )  # fmt: skip


# --- clock offset --------------------------------------------------------------------------------

#: How fast, at most, an offset sample is assumed to go stale: RFC 5905's frequency tolerance
#: (PHI), an assumption, not a measurement. On loopback, Chromium's ``performance.timeOrigin +
#: performance.now()`` against the router's ``time.time_ns()`` drifted 0.085 ppm over 60 s (a fit
#: through the best quarter of 251 pongs, residuals 0.034 ms sd), far below it; a linear drift
#: fit would need minutes of samples to beat it, since each sample is only known to +-0.3 ms.
#: It costs 15 us of bound per second of a sample's age, and frequent pings keep that age short.
MAX_DRIFT_PPM: Final = 15.0


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One ping/pong exchange, seen from the server."""

    t_ns: int
    """Server time halfway through the exchange (about when the client read its clock)."""
    rtt_ns: int
    """Round trip: the sample's offset is wrong by at most half of it."""
    offset_ns: int
    """``(t_sent + t_received) / 2 - t_client``: server minus client."""


class ClockOffset:
    """Server-minus-client clock offset from ping/pong exchanges (NTP's clock filter).

    For a ping sent at server time ``t0`` and answered with client time ``tc``, received back at
    ``t3``, the offset is ``(t0 + t3) / 2 - tc`` with an error of at most half the round trip,
    whatever the split between the two directions. As a sample ages its bound grows by the
    clocks' possible drift (``max_drift_ppm``), so the estimate is the sample whose bound
    ``rtt / 2 + drift * age`` is the smallest among those of the last ``window_s`` seconds: a
    fresh sample replaces an old one once the old one's lower round trip no longer pays for its
    age. The bound of each converted time is ``error_ns(now)``.

    Why not simply the minimum round trip of the last 16 pings, one every 5 s: measured with one
    Chromium page at 60 fps on loopback (4 runs), the start-up pings, sent while page and router
    set up the video, came back after 0.6-27.8 ms (later: from 0.54 ms, p50 0.78-0.89 ms), their
    offsets off by -4.0 to +3.6 ms. In a run where none of the first five was good, the best
    (4.5 ms) was kept until the next ping 5 s later: 319 reports converted 1.67 ms off
    (analysed-to-router p50 2.11 ms, then 0.45 ms); off the other way, such rows go negative.
    Frequent pings (``carom_router.session.Limits``) give a good sample within a second; the
    time window keeps about a minute of them whatever the ping rate.
    """

    def __init__(
        self,
        window_s: float = 60.0,
        max_drift_ppm: float = MAX_DRIFT_PPM,
        max_samples: int = 1024,
    ) -> None:
        self.window_ns = int(window_s * 1e9)
        self.max_drift_ppm = max_drift_ppm
        self._samples: deque[ClockSample] = deque(maxlen=max_samples)
        self._best: ClockSample | None = None
        self.samples = 0

    def add(self, t_sent_ns: int, t_client_ms: float, t_recv_ns: int) -> None:
        rtt = t_recv_ns - t_sent_ns
        if rtt < 0:
            return
        mid = (t_sent_ns + t_recv_ns) // 2
        self._samples.append(ClockSample(mid, rtt, mid - round(t_client_ms * 1e6)))
        self.samples += 1
        newest = max(s.t_ns for s in self._samples)  # in order from the router, but be safe
        horizon = newest - self.window_ns
        if any(s.t_ns < horizon for s in self._samples):
            kept = [s for s in self._samples if s.t_ns >= horizon]
            self._samples = deque(kept, maxlen=self._samples.maxlen)
        # Every sample's bound grows at the same rate, so their order (and the best) can only
        # change when a sample arrives or leaves: choose it here, not once per report.
        self._best = min(self._samples, key=lambda s: self._bound(s, newest))

    def _bound(self, sample: ClockSample, now_ns: int) -> int:
        age = max(0, now_ns - sample.t_ns)
        return -(-sample.rtt_ns // 2) + math.ceil(age * self.max_drift_ppm / 1e6)

    @property
    def known(self) -> bool:
        return self._best is not None

    @property
    def best(self) -> ClockSample | None:
        """The sample the offset comes from (None before the first pong)."""
        return self._best

    @property
    def offset_ns(self) -> int:
        return self._best.offset_ns if self._best is not None else 0

    @property
    def rtt_ns(self) -> int:
        return self._best.rtt_ns if self._best is not None else 0

    def error_ns(self, now_ns: int) -> int | None:
        """Bound on the offset's error at server time ``now_ns``; None before the first pong."""
        return None if self._best is None else self._bound(self._best, now_ns)

    def to_server_ns(self, t_client_ms: float | None) -> int | None:
        if t_client_ms is None:
            return None
        return round(t_client_ms * 1e6) + self.offset_ns


# --- rate limiting -------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` events per second with bursts of ``burst``; time is passed in (seconds)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
