"""Message schemas for Carom's three Pulsar topics, defined once for every service and the CLI.

Wire format: JSON (UTF-8), one message per Pulsar message, keyed by ``session_id``.
Every message carries ``kind`` (which schema) and ``schema_version``.

Clock: every ``t_*_ns`` field is nanoseconds since the Unix epoch (UTC) on the *server* clock
(``time.time_ns()`` on the host running the service). Browser timestamps are converted to it by
the router with a per-session offset estimate, recorded in ``clock_offset_ns``.

Frame identity: a frame is identified within its session by ``rtp_ts``, the 32-bit RTP timestamp
(90 kHz) the browser sees on the decoded frame. The simulator publishes it with every truth message,
together with its own frame counter ``frame``. ``rtp_ts`` wraps at 2**32; the tracker unwraps it.

Validation happens on decode (``decode``) and on ``validate``; constructing a Struct directly does
not check ranges, so code that builds messages from untrusted input must call ``validate`` or
``build``.
"""

from __future__ import annotations

import math
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION: Final = 1

#: Largest frame side, in pixels, that any Carom component accepts.
MAX_FRAME_SIDE: Final = 8192
_MAX_L2: Final = 2.0 * MAX_FRAME_SIDE
_MAX_EPOCH_NS: Final = 2**63 - 1
_MAX_FRAME: Final = 2**53

SessionId = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="1-64 chars of [A-Za-z0-9_.-]"),
]
RtpTimestamp = Annotated[int, Meta(ge=0, le=2**32 - 1, description="RTP timestamp, 90 kHz")]
FrameNumber = Annotated[int, Meta(ge=0, le=_MAX_FRAME, description="frame counter from 0")]
PhaseNumber = Annotated[int, Meta(ge=0, le=2**31, description="a session's phase, from 0")]
FrameSide = Annotated[int, Meta(ge=1, le=MAX_FRAME_SIDE, description="pixels")]
EpochNs = Annotated[int, Meta(ge=0, le=_MAX_EPOCH_NS, description="ns since Unix epoch")]
Pixel = Annotated[float, Meta(ge=0.0, le=float(MAX_FRAME_SIDE), description="pixels")]
ErrorPx = Annotated[float, Meta(ge=0.0, le=_MAX_L2, description="L2 distance, pixels")]
OffsetNs = Annotated[int, Meta(ge=-(2**62), le=2**62, description="server - client clock, ns")]
Version = Literal[1]
Status = Literal["ok", "not_detected", "missed", "not_sent"]
"""What became of one frame due: ``ok`` (joined, ball found), ``not_detected`` (joined, no ball),
``missed`` (sent, but no report came in the window), ``not_sent`` (due, never sent: see
``NotSent``). Every frame index of a session's life gets exactly one of these (docs/accounting.md).
"""
Latency = Annotated[
    str,
    Meta(
        pattern=r"^(smooth|interactive|[0-9]{1,5}-[0-9]{1,5})$",
        description="smooth, interactive, or MIN-MAX playout delay in ms (multiples of 10)",
    ),
]
"""How the browser plays a session's video out (the playout-delay RTP header extension).

``smooth``: the browser's default (Chromium holds each frame ~7-12 ms to smooth arrival jitter);
``interactive``: min = max = 0 ms, each frame rendered as soon as it is decoded (about half the
glass-to-glass latency, with network and CPU jitter passed straight to the screen);
``MIN-MAX``: explicit bounds in ms, multiples of 10 within 0..40950 (e.g. ``0-100``).
Every truth record and CSV row says which mode its frame was sent in, so runs in different modes
are never mixed up. A browser that did not offer the extension always gets ``smooth``.
"""
MAX_PLAYOUT_MS: Final = 40_950
"""The largest bound the playout-delay element can carry (12 bits of 10 ms units)."""


def playout_delay(latency: str) -> tuple[int, int] | None:
    """``(min_ms, max_ms)`` a sender writes for ``latency``, or None for ``smooth`` (write nothing).

    Raises ValueError for anything that is not a mode (checked again on every decode: a
    ``Latency`` field's pattern alone lets ``90-10`` or ``5-7`` through).
    """
    if latency == "smooth":
        return None
    if latency == "interactive":
        return (0, 0)
    low, sep, high = latency.partition("-")
    if not (sep and low.isdigit() and high.isdigit()):
        raise ValueError(f"latency {latency!r}: expected smooth, interactive or MIN-MAX (ms)")
    lo, hi = int(low), int(high)
    if lo % 10 or hi % 10 or not 0 <= lo <= hi <= MAX_PLAYOUT_MS:
        raise ValueError(
            f"latency {latency!r}: MIN and MAX must be multiples of 10 ms with "
            f"0 <= MIN <= MAX <= {MAX_PLAYOUT_MS}"
        )
    return (lo, hi)


NotSentReason = Literal["late"]
"""Why a due frame was never sent. ``late``: the simulator's track was asked for it after its
time had passed (CPU starvation, an event-loop stall) and skipped to the frame due now."""


def _require_finite(msg: Struct, names: tuple[str, ...]) -> None:
    # Meta bounds already reject NaN/inf on decode; this also covers directly built messages.
    for name in names:
        value = getattr(msg, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")


class _Message(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    """Fields every message shares."""

    schema_version: Version = SCHEMA_VERSION
    session_id: SessionId


class Truth(_Message, tag="truth", kw_only=True, frozen=True):
    """Where the ball really was in one rendered frame (simulator -> truth topic)."""

    frame: FrameNumber
    rtp_ts: RtpTimestamp
    x: Pixel
    y: Pixel
    t_render_ns: EpochNs
    latency: Latency = "smooth"
    "The playout mode the frame was sent in (``Latency``)."
    phase: PhaseNumber = 0
    "The session's phase the frame was sent in (``PhaseSummary``): its parameters in force."
    width: FrameSide | None = None
    "The frame's width in pixels (its geometry: a session can change resolution mid-stream)."
    height: FrameSide | None = None

    def __post_init__(self) -> None:
        _require_finite(self, ("x", "y"))
        playout_delay(self.latency)


class NotSent(_Message, tag="not_sent", kw_only=True, frozen=True):
    """A frame that was due but never sent (simulator -> truth topic).

    It still gets its one row (status ``not_sent``): a frame the system failed to deliver is a
    failure of the system, and leaving it out would make coverage look better than it was.
    ``rtp_ts`` is the timestamp it would have carried, so it is keyed like any frame.
    """

    frame: FrameNumber
    rtp_ts: RtpTimestamp
    t_due_ns: EpochNs
    "When the frame was due (epoch ns, server clock)."
    reason: NotSentReason
    latency: Latency = "smooth"
    "The session's playout mode when the frame was due (``Latency``)."
    phase: PhaseNumber = 0
    "The session's phase when the frame was due."

    def __post_init__(self) -> None:
        playout_delay(self.latency)


class PhaseSummary(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One phase of a session: the parameters in force, the frames it was due, what was sent.

    A session starts in phase 0; every live change (``carom.signaling.SessionControl``) and
    every stop or resume starts the next. A ``stopped`` phase has no frame due. ``bytes_sent``
    is the RTP payload the simulator's sender put on the wire in the phase (its own counter),
    so ``8 * bytes_sent / duration`` is the bitrate sent, measured, beside the target.
    """

    phase: PhaseNumber
    state: Literal["streaming", "stopped"]
    first_frame: FrameNumber
    "Frames ``first_frame .. first_frame + frames_due - 1`` were due in this phase."
    frames_due: Annotated[int, Meta(ge=0, le=_MAX_FRAME)]
    frames_sent: Annotated[int, Meta(ge=0, le=_MAX_FRAME)]
    t_start_ns: EpochNs
    t_end_ns: EpochNs
    fps: Annotated[float, Meta(gt=0, le=1000)]
    width: FrameSide
    height: FrameSide
    bitrate: Annotated[int, Meta(ge=0)]
    "The target bitrate in bits/s; 0: the encoder's own."
    keyframe_interval: Annotated[int, Meta(ge=0)]
    gravity: float
    vx: float
    vy: float
    cor: float
    background: Annotated[str, Meta(max_length=64)]
    bytes_sent: Annotated[int, Meta(ge=0)]
    warning: Annotated[str, Meta(max_length=500)] = ""
    "Why the phase's L2 figures may be wrong (a background with the ball's colour); or empty."
    latency: Latency = "smooth"
    "The playout mode in force (records written before it existed were all smooth)."
    network: Annotated[str, Meta(max_length=64)] = "clear"
    "The emulated network's profile name in force (``carom.impairment``; a custom one's own)."
    nacks: Annotated[int, Meta(ge=0)] = 0
    "RTCP NACKs the sender received in the phase: the receiver asking for lost packets again."
    retransmitted: Annotated[int, Meta(ge=0)] = 0
    "Packets those NACKs asked for (each resent if the sender still had it)."
    keyframe_requests: Annotated[int, Meta(ge=0)] = 0
    "RTCP PLIs and FIRs the sender received in the phase: the receiver asking for a keyframe."


class SessionEnd(_Message, tag="session_end", kw_only=True, frozen=True):
    """A session's stream stopped (simulator -> truth topic, after its last frame's truth).

    Frames ``0 .. frames_due - 1`` were due: each has a ``Truth`` or a ``NotSent`` before this
    message on the topic (same producer, same key, so in order). The tracker answers with
    ``SessionResults`` once every one of them has its row.
    """

    frames_due: Annotated[int, Meta(ge=0, le=_MAX_FRAME)]
    t_end_ns: EpochNs
    reason: Annotated[str, Meta(max_length=200)] = ""
    phases: Annotated[list[PhaseSummary], Meta(max_length=10_000)] = msgspec.field(
        default_factory=list
    )
    "The session's phases in order (empty from a simulator that does not record them)."


class SessionResults(_Message, tag="session_results", kw_only=True, frozen=True):
    """Every frame due of a session has its row (tracker -> errors topic, after its last result).

    The router tells the client (``end`` control message) and closes the session, so that the
    client's counts cover exactly the frames the tracker's CSV covers.
    """

    frames_due: Annotated[int, Meta(ge=0, le=_MAX_FRAME)]
    t_computed_ns: EpochNs
    reason: Annotated[str, Meta(max_length=200)] = ""
    "The simulator's reason for ending the stream (``SessionEnd.reason``), for the client."


class TrackerStatus(
    Struct,
    tag="tracker_status",
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="kind",
):
    """A tracker is alive and joining (tracker -> errors topic, every ``interval_ms``).

    Routers read every message of the errors topic, so this is how they know a tracker is there
    without an HTTP dependency on it: no status for a few intervals means live results have
    stopped (their ``/health`` and their clients are told). ``behind_ms``: how far the join's
    clock trails the wall clock (a backlog being drained), 0 when live.
    """

    schema_version: Version = SCHEMA_VERSION
    tracker: Annotated[str, Meta(min_length=1, max_length=200)]
    t_ns: EpochNs
    interval_ms: Annotated[int, Meta(ge=1, le=60_000)]
    behind_ms: Annotated[int, Meta(ge=0)] = 0


class Centroid(_Message, tag="centroid", kw_only=True, frozen=True):
    """What the browser found in one decoded frame (router -> centroid topic).

    ``x``/``y`` are None exactly when ``detected`` is false: a missed detection is never 0 error.
    Browser times are already on the server clock (see ``clock_offset_ns``); None when the
    browser could not provide them.
    """

    rtp_ts: RtpTimestamp
    detected: bool
    x: Pixel | None = None
    y: Pixel | None = None
    t_browser_recv_ns: EpochNs | None = None
    t_browser_analysed_ns: EpochNs | None = None
    t_router_recv_ns: EpochNs
    t_published_ns: EpochNs
    clock_offset_ns: OffsetNs = 0
    clock_error_ns: Annotated[int, Meta(ge=0, le=2**62)] | None = None
    """Bound on the error of ``clock_offset_ns`` (half the round trip of the ping it came from):
    each browser time above is right to within this. None when no estimate existed."""

    def __post_init__(self) -> None:
        _require_finite(self, ("x", "y"))
        if self.detected and (self.x is None or self.y is None):
            raise ValueError("`x` and `y` are required when `detected` is true")
        if not self.detected and (self.x is not None or self.y is not None):
            raise ValueError("`x` and `y` must be null when `detected` is false")


class ClientStats(_Message, tag="client_stats", kw_only=True, frozen=True):
    """A browser's WebRTC receiver stats (getStats, every 2 s), router -> centroid topic.

    What the page measured of the video it received, so the report can put quality (decoded
    fps, freezes, jitter buffer, bitrate received) beside L2 and latency, per phase (by time:
    ``t_router_recv_ns``). Counters are the browser's cumulative values; None when not given.
    """

    t_router_recv_ns: EpochNs
    fps: Annotated[float, Meta(ge=0, le=1000)] | None = None
    jitter_buffer_ms: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    decode_ms: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    frames_received: Annotated[int, Meta(ge=0)] | None = None
    frames_decoded: Annotated[int, Meta(ge=0)] | None = None
    frames_dropped: Annotated[int, Meta(ge=0)] | None = None
    freeze_count: Annotated[int, Meta(ge=0)] | None = None
    freezes_ms: Annotated[float, Meta(ge=0, le=1e12)] | None = None
    bytes_received: Annotated[int, Meta(ge=0)] | None = None
    width: FrameSide | None = None
    "The decoded frame's size, as the browser saw it."
    height: FrameSide | None = None
    codec: Annotated[str, Meta(max_length=64)] | None = None
    jitter_buffer_delay_s: Annotated[float, Meta(ge=0, le=1e9)] | None = None
    "getStats' cumulative ``jitterBufferDelay``: with the next, a phase's own jitter buffer."
    jitter_buffer_emitted: Annotated[int, Meta(ge=0)] | None = None
    "getStats' cumulative ``jitterBufferEmittedCount``."

    def __post_init__(self) -> None:
        _require_finite(
            self, ("fps", "jitter_buffer_ms", "decode_ms", "freezes_ms", "jitter_buffer_delay_s")
        )


class FrameResult(_Message, tag="error", kw_only=True, frozen=True):
    """One frame's result: truth vs report, the L2 error and every hop's timestamp (tracker).

    The result of the L2 measurement, not a failure (a failure message is ``protocol.Error``). Its
    wire tag stays ``"error"`` and its topic ``carom-errors``: records already spooled or stored,
    and every consumer of the topic, read it under those names.

    ``truth_x``/``truth_y`` are None only for ``not_sent`` (the frame was never rendered); its
    ``t_render_ns`` is then when it was due.

    The tracker fills it by field name from its record of the frame (``carom_tracker.join.
    FrameRow``, which is also the CSV row): a field added here must exist there. That record's
    ``reason``, ``clock_error_ns`` and ``latency`` are not here, since every reader on this schema
    would reject a result carrying them (unknown fields are refused).
    """

    frame: FrameNumber
    rtp_ts: RtpTimestamp
    status: Status
    truth_x: Pixel | None
    truth_y: Pixel | None
    x: Pixel | None = None
    y: Pixel | None = None
    l2: ErrorPx | None = None
    t_render_ns: EpochNs
    t_browser_recv_ns: EpochNs | None = None
    t_browser_analysed_ns: EpochNs | None = None
    t_router_recv_ns: EpochNs | None = None
    t_published_ns: EpochNs | None = None
    t_tracker_consumed_ns: EpochNs | None = None
    t_computed_ns: EpochNs

    def __post_init__(self) -> None:
        _require_finite(self, ("truth_x", "truth_y", "x", "y", "l2"))
        if (self.status == "ok") != (self.l2 is not None):
            raise ValueError("`l2` is required when `status` is 'ok' and null otherwise")
        if (self.status == "not_sent") != (self.truth_x is None or self.truth_y is None):
            raise ValueError("`truth_x`/`truth_y` are null exactly when `status` is 'not_sent'")


MAX_RESULTS_PER_MESSAGE: Final = 2_000
"""Most ``FrameResult``s one ``FrameResults`` carries: ~0.9 MB of JSON, well under Pulsar's 5 MB
default message limit."""


class FrameResults(_Message, tag="results", kw_only=True, frozen=True):
    """Several of one session's frame results in frame order, as one message (tracker -> errors
    topic): what a tracker made durable in one commit, published at once.

    One message per frame cost the tracker a Pulsar send and its confirmation per frame, a
    seventh of its time while draining a backlog (bench/results/tracker-profile.md); a commit's
    results of a session go out together anyway (after the fsync that makes their rows durable),
    so they share one message and arrive as they did. Every result carries the session's id.
    """

    results: Annotated[list[FrameResult], Meta(min_length=1, max_length=MAX_RESULTS_PER_MESSAGE)]

    def __post_init__(self) -> None:
        for r in self.results:
            if r.session_id != self.session_id:
                raise ValueError(
                    f"a result of session {r.session_id!r} in {self.session_id!r}'s results"
                )


Message = (
    Truth
    | NotSent
    | SessionEnd
    | Centroid
    | ClientStats
    | FrameResult
    | FrameResults
    | SessionResults
    | TrackerStatus
)
TruthTopic = Truth | NotSent | SessionEnd
"""Every kind the truth topic carries, in producer order per session."""
CentroidTopic = Centroid | ClientStats
"""Every kind the centroid topic carries (the router's, keyed by session)."""
ErrorsTopic = FrameResult | FrameResults | SessionResults | TrackerStatus
"""Every kind the errors topic carries."""
M = TypeVar(
    "M", Truth, NotSent, SessionEnd, Centroid, ClientStats, FrameResult, FrameResults,
    SessionResults, TrackerStatus,
)  # fmt: skip

_encoder = msgspec.json.Encoder()
_decoders: dict[object, msgspec.json.Decoder[object]] = {}


class SchemaError(ValueError):
    """A message failed validation; the text names the offending field."""


def encode(msg: Message) -> bytes:
    """Serialise a message for Pulsar."""
    return _encoder.encode(msg)


def decode(data: bytes | str, kind: type[M]) -> M:
    """Parse and validate one message of a known schema."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return dec.decode(data)  # type: ignore[return-value]
    except msgspec.DecodeError as exc:
        name = getattr(kind, "__name__", "carom").lower()
        raise SchemaError(f"invalid {name} message: {exc}") from None


def decode_truth_topic(data: bytes | str) -> Truth | NotSent | SessionEnd:
    """Parse and validate a message from the truth topic (any of its kinds)."""
    return decode(data, TruthTopic)  # type: ignore[arg-type]


def decode_centroid_topic(data: bytes | str) -> Centroid | ClientStats:
    """Parse and validate a message from the centroid topic (any of its kinds)."""
    return decode(data, CentroidTopic)  # type: ignore[arg-type, return-value]


def decode_errors_topic(
    data: bytes | str,
) -> FrameResult | FrameResults | SessionResults | TrackerStatus:
    """Parse and validate a message from the errors topic (any of its kinds)."""
    return decode(data, ErrorsTopic)  # type: ignore[arg-type, return-value]


def results_in(msg: Message) -> list[FrameResult]:
    """The frame results a message carries: one, a ``FrameResults``' list, or none."""
    if isinstance(msg, FrameResult):
        return [msg]
    if isinstance(msg, FrameResults):
        return msg.results
    return []


def decode_any(data: bytes | str) -> Message:
    """Parse and validate a message of any Carom schema (dispatch on ``kind``)."""
    return decode(data, Message)  # type: ignore[arg-type]


def build(kind: type[M], **fields: object) -> M:
    """Construct a message from untrusted values, with full validation."""
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"invalid {kind.__name__.lower()} message: {exc}") from None


def validate(msg: M) -> M:
    """Check a directly constructed message against its schema's bounds."""
    return build(type(msg), **msgspec.structs.asdict(msg))


def to_dict(msg: Message) -> dict[str, object]:
    """Plain dict (with ``kind``) for JSON lines and CSV writers."""
    out = msgspec.to_builtins(msg)
    assert isinstance(out, dict)
    return out


def json_schema() -> dict[str, object]:
    """JSON Schema of every message kind, for documentation and external consumers."""
    return msgspec.json.schema(Message)
