"""One session's typed channels (docs/channels.md), as a pure state machine: no I/O.

Bytes of the client's channel streams and channel datagrams go in, with the routes in force and
the time; actions come out: publish this ``ChannelMessage`` on this route, refuse this message
(tell the client, rate-limited, through the session's error path), count a bad stream (a bad
message of the session), and at the end one ``ChannelEnd`` per type and topic the session used.
The shell (``carom_router.channel_io``) publishes and reports back what the broker did
(``settled``), so ``ChannelEnd`` waits for every message of its type to be settled and can list
the ones the broker never took (``failed_seqs``).

What is checked, in order, so a refusal costs the router as little as it can:

1. the frame's head (``ChannelReader``): a stream that is not frames is a bad message
   (``bad_frame``) and the rest of it is ignored; a type with no route (``unknown_type``) or a
   body over its route's ``max_message_bytes`` (``over_limit``) is skipped unread;
2. the type's token bucket (``rate``: ``max_rate``, ``bucket_burst``), one per session and type;
3. the route's format (``bad_format``, ``carom.channels.check_format``).

Refusals are counted per type under the route's name, or ``unknown`` for a name with no route:
a client cannot make the router keep a label (or a state) per name it invents.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from carom import channels as ch
from carom import protocol as p

NS: Final = 1_000_000_000
#: The label of refusals of a type with no route (any name a client sends).
UNKNOWN: Final = "unknown"
#: Channel streams one session may have open at once; beyond it a new one is a bad message and
#: ignored (a client needs one per type: five in the default routes).
MAX_STREAMS: Final = 64
_MAX_EPOCH_NS: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class PublishChannel:
    """Publish ``message`` on ``route.topic``, keyed by its session; then call ``settled``."""

    route: ch.Route
    message: ch.ChannelMessage


@dataclass(frozen=True, slots=True)
class Refuse:
    """A message refused (counted already): tell the client, through the rate-limited path."""

    label: str
    "The route's name, or ``unknown``."
    seq: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BadStream:
    """A stream that is not channel frames: one bad message of the session (``bad_frame``)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PublishEnd:
    """The session's last word on one type, on one topic it used, after its last message."""

    route: ch.Route
    end: ch.ChannelEnd


@dataclass(frozen=True, slots=True)
class BadDatagram:
    """A channel datagram that is not one frame: rejected like a bad report datagram (counted,
    told at a bounded rate), not a bad message: datagrams come in floods, streams do not."""

    code: str
    message: str


ChannelAction = PublishChannel | Refuse | BadStream | BadDatagram | PublishEnd


@dataclass
class TypeState:
    """What one session did with one routed type: the accounting its ``ChannelEnd`` carries."""

    name: str
    accepted: int = 0
    last_seq: int = -1
    refused: int = 0
    refused_seqs: list[int] = field(default_factory=list)
    failed_seqs: list[int] = field(default_factory=list)
    #: Published and not yet settled by the broker (acked, or failed after its retries).
    pending: int = 0
    #: Every topic this type's messages went to in this session, with the route as it was
    #: (a reload may move a type to another topic mid-session: each one gets the end).
    topics: dict[str, ch.Route] = field(default_factory=dict)
    bucket: p.TokenBucket | None = None
    bucket_of: tuple[float, float] = (0.0, 0.0)
    ended: bool = False

    def saw(self, seq: int) -> None:
        self.last_seq = max(self.last_seq, seq)

    def refuse(self, seq: int) -> None:
        self.refused += 1
        if len(self.refused_seqs) < ch.MAX_LISTED_SEQS:
            self.refused_seqs.append(seq)


@dataclass
class _Stream:
    reader: ch.ChannelReader = field(default_factory=ch.ChannelReader)
    #: Not frames: the rest of the stream is ignored.
    broken: bool = False


@dataclass(eq=False)  # one per session, kept in sets: identity, not value
class SessionChannels:
    """One session's channels: its streams' readers, its per-type buckets and accounting."""

    routes: ch.Routes
    session_id: str
    types: dict[str, TypeState] = field(default_factory=dict)
    #: Counters by ``(label, what)``: ``accepted``, ``bytes``, ``refused_<code>``, ``failed``.
    counters: Counter[tuple[str, str]] = field(default_factory=Counter)
    closed: bool = False
    reason: str = ""
    _streams: dict[int, _Stream] = field(default_factory=dict)

    # --- inputs -------------------------------------------------------------------------------

    def set_routes(self, routes: ch.Routes) -> None:
        """The routes reloaded: what comes next is judged by them (buckets follow new rates)."""
        self.routes = routes

    def stream(
        self,
        stream_id: int,
        data: bytes,
        end_stream: bool,
        now_ns: int,
        clock: p.ClockOffset,
    ) -> list[ChannelAction]:
        """Bytes of one channel stream (the session has said hello)."""
        if self.closed:
            return []
        st = self._streams.get(stream_id)
        if st is None:
            if len(self._streams) >= MAX_STREAMS:
                if end_stream:
                    return []
                st = self._streams[stream_id] = _Stream(broken=True)
                return [BadStream("bad_frame", f"over {MAX_STREAMS} channel streams at once")]
            st = self._streams[stream_id] = _Stream()
        out: list[ChannelAction] = []
        if not st.broken:
            st.reader.push(data)
            while True:
                try:
                    item = st.reader.next(self.routes.limit)
                except ch.ChannelError as exc:
                    st.broken = True
                    st.reader.clear()
                    out.append(BadStream(exc.code, f"channel stream: {exc}"))
                    break
                if item is None:
                    break
                if isinstance(item, ch.Skipped):
                    out += self._refuse(item.head.type, item.head.seq, item.code, item.message)
                else:
                    out += self._frame(item, now_ns, clock)
        if end_stream:
            # A stream cut mid-frame: that message never reached the router (ChannelEnd's
            # "never reached"), nothing to refuse.
            self._streams.pop(stream_id, None)
        return out

    def datagram(self, data: bytes, now_ns: int, clock: p.ClockOffset) -> list[ChannelAction]:
        """One channel datagram (kind ``KIND_CHANNEL``): taken only for routes with datagrams."""
        if self.closed:
            return []
        try:
            parsed = ch.parse_head(data)
        except ch.ChannelError as exc:
            return [BadDatagram(exc.code, f"channel datagram: {exc}")]
        if parsed is None:
            return [BadDatagram("bad_frame", f"channel datagram of {len(data)} bytes: truncated")]
        head, _ = parsed
        route = self.routes.routes.get(head.type)
        if route is None:
            return self._refuse(head.type, head.seq, "unknown_type", f"no route for {head.type!r}")
        if not route.datagrams:
            why = f"{head.type} is not taken as datagrams (its route: datagrams false)"
            return self._refuse(head.type, head.seq, "bad_format", why)
        if head.length > route.max_message_bytes:
            why = f"{head.type} message of {head.length} bytes (max {route.max_message_bytes})"
            return self._refuse(head.type, head.seq, "over_limit", why)
        try:
            frame = ch.decode_frame(data)
        except ch.ChannelError as exc:
            return [BadDatagram(exc.code, f"channel datagram: {exc}")]
        return self._frame(frame, now_ns, clock)

    def settled(self, type_: str, seq: int, ok: bool, now_ns: int) -> list[ChannelAction]:
        """The broker took a published message (``ok``) or never will (after its retries)."""
        st = self.types.get(type_)
        if st is None:
            return []
        st.pending = max(0, st.pending - 1)
        if not ok:
            self.counters[(type_, "failed")] += 1
            if len(st.failed_seqs) < ch.MAX_LISTED_SEQS:
                st.failed_seqs.append(seq)
        return self._ends(now_ns)

    def overflow(self, type_: str, seq: int, message: str, now_ns: int) -> list[ChannelAction]:
        """The shell could not take a message the core accepted (its route's queue is full and
        its policy refuses, or the spool is full): it becomes a refusal, and was never sent."""
        st = self.types.get(type_)
        if st is not None:
            st.pending = max(0, st.pending - 1)
            st.accepted = max(0, st.accepted - 1)
            self.counters[(type_, "accepted")] -= 1
        out = self._refuse(type_, seq, "overflow", message)
        return out + self._ends(now_ns)

    def close(self, reason: str, now_ns: int) -> list[ChannelAction]:
        """The session ended: nothing more is taken; each type's ends follow once it is settled."""
        if self.closed:
            return []
        self.closed, self.reason = True, reason
        self._streams.clear()
        return self._ends(now_ns)

    @property
    def done(self) -> bool:
        """Closed and every end published: nothing more will come of this session."""
        return self.closed and all(t.ended for t in self.types.values())

    # --- internals ----------------------------------------------------------------------------

    def _ends(self, now_ns: int) -> list[ChannelAction]:
        if not self.closed:
            return []
        out: list[ChannelAction] = []
        for st in self.types.values():
            if st.ended or st.pending:
                continue
            st.ended = True
            for route in st.topics.values():
                out.append(PublishEnd(route, self._end(st, now_ns)))
        return out

    def _end(self, st: TypeState, now_ns: int) -> ch.ChannelEnd:
        return ch.ChannelEnd(
            session_id=self.session_id,
            type=st.name,
            accepted=st.accepted,
            last_seq=st.last_seq,
            refused=st.refused,
            refused_seqs=sorted(st.refused_seqs),
            failed_seqs=sorted(st.failed_seqs),
            reason=self.reason,
            t_end_ns=now_ns,
        )

    def _state(self, name: str, route: ch.Route) -> TypeState:
        st = self.types.get(name)
        if st is None:
            st = self.types[name] = TypeState(name)
        if route.topic not in st.topics:
            st.topics[route.topic] = route
        return st

    def _refuse(self, type_: str, seq: int, code: str, message: str) -> list[ChannelAction]:
        route = self.routes.routes.get(type_)
        st = self.types.get(type_)
        if route is not None:
            st = self._state(type_, route)
        label = type_ if st is not None else UNKNOWN
        if st is not None:
            st.saw(seq)
            st.refuse(seq)
        self.counters[(label, f"refused_{code}")] += 1
        return [Refuse(label, seq, code, message)]

    def _frame(self, frame: ch.Frame, now_ns: int, clock: p.ClockOffset) -> list[ChannelAction]:
        route = self.routes.routes.get(frame.type)
        if route is None:  # the routes changed between its head and its body
            return self._refuse(
                frame.type, frame.seq, "unknown_type", f"no route for {frame.type!r}"
            )
        st = self._state(frame.type, route)
        rate = (route.max_rate, route.bucket_burst)
        if st.bucket is None or st.bucket_of != rate:
            st.bucket, st.bucket_of = p.TokenBucket(*rate), rate
        if not st.bucket.allow(now_ns / NS):
            why = f"{frame.type} over {route.max_rate:g} messages/s (burst {route.bucket_burst:g})"
            return self._refuse(frame.type, frame.seq, "rate", why)
        try:
            ch.check_format(route.format, frame)
        except ch.ChannelError as exc:
            return self._refuse(frame.type, frame.seq, exc.code, str(exc))
        st.saw(frame.seq)
        st.accepted += 1
        st.pending += 1
        self.counters[(frame.type, "accepted")] += 1
        self.counters[(frame.type, "bytes")] += len(frame.payload)
        t_capture, error = capture_ns(frame.t_capture_ms, clock, now_ns)
        message = ch.ChannelMessage(
            session_id=self.session_id,
            type=frame.type,
            format=route.format,
            seq=frame.seq,
            t_capture_ms=frame.t_capture_ms,
            t_capture_ns=t_capture,
            clock_error_ns=error,
            t_router_recv_ns=now_ns,
            t_published_ns=now_ns,  # restamped by the shell as it hands it to Pulsar
            meta=frame.meta,
            payload=frame.payload,
        )
        return [PublishChannel(route, message)]


def capture_ns(
    t_capture_ms: float, clock: p.ClockOffset, now_ns: int
) -> tuple[int | None, int | None]:
    """A client capture time on the server's clock and its error bound, or ``(None, None)``
    when the client did not know it (NaN) or the session has no clock sample yet."""
    if math.isnan(t_capture_ms) or not clock.known:
        return None, None
    t = clock.to_server_ns(t_capture_ms)
    if t is None or not 0 <= t <= _MAX_EPOCH_NS:
        return None, None
    return t, clock.error_ns(now_ns)
