"""One browser session in the router, as a sans-I/O state machine.

Bytes and times go in (``control``, ``datagram``, ``tick``, and the outcome of the simulator
relay); actions come out (send these control bytes, relay this offer, publish this report, close).
The asyncio shell (``carom_router.link``) only performs the actions, so every protocol rule --
ordering, limits, clock conversion, error throttling -- is tested in memory.

States: ``hello`` (waiting for the client's hello) -> ``ready`` (welcome sent; offers allowed)
-> ``negotiating`` (an offer is at the simulator) -> ``active`` (answer delivered) ->
``draining`` (the client said bye: the stream is stopped, reports still in flight are taken, and
the session waits for the tracker's word that every frame due has its result) -> ``ending``
(``end`` sent: the client closes the session, or the router does after ``end_linger_s``) ->
``closed``. The client closes, not the router: closing right after ``end`` lost it once in
Chromium 156 (the page saw the session close before it read ``end`` on the control stream).
The drain is what makes a client's counts equal the tracker's CSV (docs/accounting.md): closing
at once would cut off the last frames' results, and frames rendered after the client stopped
looking would count as missed.

Live control (``control``, docs/protocol.md) is taken while the video runs (``active``): one in
flight per session, answered with a ``control_ack`` of the same id whatever happens, so a client
never waits on a control the router dropped. Each one reconfigures the simulator's stream, so
they reach it at ``Limits.max_live_control_rate`` at most, on top of the cap on all control
messages; a refused control changes nothing and costs the simulator nothing.

A hostile client costs the others little: its first frame must be a small hello
(``MAX_HELLO_BYTES``) within ``hello_timeout_s``; error replies leave at ``max_error_rate`` at
most (the rest are counted); and after ``max_bad_messages`` bad or unexpected control messages
the session is closed (fatal ``too_many_errors``, close code 2). Measured before these: 50,000
five-byte bad frames drew 50,000 error replies (6.9 MB) and the session stayed open.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import msgspec

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionControl, SessionParams, SessionState, StreamState

NS: Final = 1_000_000_000


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What one session may do, as an operator sets it.

    The router's ``limits`` settings section is this struct plus the router-wide limits
    (``carom_router.config.LimitsSettings`` subclasses it), so each default is written here once
    and a session gets the settings section itself. The protocol's own pacing, which no operator
    sets, is ``Pacing``.
    """

    max_report_rate: float = 240.0
    report_burst: float = 480.0
    #: A session must say hello this soon after it opens, or it is closed (``hello_timeout``).
    #: Clients send it at once (the page and the Python client write it as they open the
    #: stream); 10 s let a silent client hold a slot for 10 s.
    hello_timeout_s: float = 3.0
    #: Measured with one Chromium page at 60 fps on loopback: the start-up pings, sent while the
    #: page negotiates its video, had round trips of 0.6-27.8 ms, later ones from 0.54 ms (p50
    #: 0.78-0.89). With a ping every 5 s the reports of the first 5 s kept a start-up sample's
    #: error (1.67 ms in one run); every 0.5 s a good sample comes within a second. Cost: ping, pong
    #: and clock estimate are 184 bytes of control messages, twice a second.
    ping_interval_s: float = 0.5
    #: Bad or unexpected control messages (unparseable, out of turn, over ``max_control_rate``,
    #: a datagram before hello) a session may send: at this many it is closed with the fatal
    #: error ``too_many_errors`` and close code 2. A correct client sends none.
    max_bad_messages: int = 10
    #: Control messages per second one session may send (token bucket, bursts of one second's
    #: worth); beyond it each message is dropped unread and counts as a bad one. The page sends
    #: about 3 a second (pongs, stats).
    max_control_rate: float = 50.0
    #: Non-fatal error messages per second to one session (bursts of ``Pacing.error_burst``);
    #: beyond it they are counted (``errors_suppressed``), not sent. 50,000 five-byte bad frames
    #: drew 50,000 error replies (6.9 MB) before this.
    max_error_rate: float = 2.0
    #: Live controls (``control``) relayed to the simulator per second, token bucket with bursts
    #: of ``live_control_burst``; beyond it a control is refused (``rate``) and never reaches the
    #: simulator. Each one reconfigures the session's stream and starts a phase; the page sends
    #: at most about 3 a second (its inputs are debounced 300 ms), a script sweeping parameters
    #: one phase after another far fewer.
    max_live_control_rate: float = 5.0
    live_control_burst: float = 10.0
    #: After bye, how long to wait for the tracker's "every frame due has its row" before
    #: closing anyway (``End(complete=False)``): the tracker's join window (2 s) plus two
    #: Pulsar hops and a tracker flush, with room for a loaded machine.
    drain_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Pacing:
    """The protocol's own pacing: fixed, not settings (tests change it to drive the core)."""

    #: At most one error message per this many seconds about rejected datagrams.
    error_interval_s: float = 1.0
    #: Pings 50 ms apart at the start (until this many pongs), for a first offset estimate.
    initial_pings: int = 5
    #: Bursts of error messages: a client that makes one honest mistake hears of it at once.
    error_burst: float = 5.0
    #: After ``end``: how long the client has to close the session itself.
    end_linger_s: float = 2.0


@dataclass(frozen=True, slots=True)
class SendControl:
    data: bytes
    #: The session's last control message (``end``): it must follow every result already sent,
    #: so the shell holds it until its held results are out.
    final: bool = False


@dataclass(frozen=True, slots=True)
class RelayOffer:
    session_id: str
    sdp: str
    params: SessionParams


@dataclass(frozen=True, slots=True)
class RelayControl:
    """PATCH the simulator's session with ``set``; its outcome goes to ``control_done`` or
    ``control_failed`` with ``control_id``."""

    session_id: str
    control_id: int
    set: SessionControl


@dataclass(frozen=True, slots=True)
class Publish:
    """A report, to the centroid topic."""

    message: schemas.Centroid


@dataclass(frozen=True, slots=True)
class PublishStats:
    """The browser's receiver stats, to the centroid topic beside its reports."""

    message: schemas.ClientStats


@dataclass(frozen=True, slots=True)
class StopStream:
    """Ask the simulator to stop this session's video (its truth then ends with SessionEnd)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Close:
    reason: str
    code: int = 0


Action = SendControl | RelayOffer | RelayControl | Publish | PublishStats | StopStream | Close

#: Why a control was refused without reaching the simulator: the first word of ``error`` in its
#: ``control_ack`` (docs/protocol.md), and the outcome it is counted under.
NO_STREAM: Final = "no stream yet"
BUSY: Final = "busy"
RATE: Final = "rate"
ENDING: Final = "ending"
_FIELD_AT = re.compile(r"^(?P<why>.*) - at `\$\.set(?:\.(?P<field>\w+))?`$", re.DOTALL)


class _ControlId(msgspec.Struct):
    """Just enough of a control message to answer it when the rest does not validate."""

    type: str
    id: int


#: Why the video stopped, when the simulator gave no reason of its own.
STOPPED_BY_SIMULATOR: Final = "the simulator ended the stream"


@dataclass
class SessionCore:
    limits: Limits
    created_ns: int
    pacing: Pacing = field(default_factory=Pacing)
    state: str = "hello"
    session_id: str | None = None
    params: SessionParams = field(default_factory=SessionParams)
    client: str = ""
    codec: str | None = None
    counters: Counter[str] = field(default_factory=Counter)
    clock: p.ClockOffset = field(default_factory=p.ClockOffset)
    stats: p.BrowserStats | None = None
    #: The stream's state and phase as the simulator last answered a control (``control_ack``).
    stream_state: StreamState = "streaming"
    phase: int = 0
    #: The id of the control at the simulator now (one at a time), or None.
    control_in_flight: int | None = None
    _reader: p.FrameReader = field(default_factory=lambda: p.FrameReader(p.MAX_HELLO_BYTES))
    _bucket: p.TokenBucket | None = None
    _control_bucket: p.TokenBucket = field(init=False)
    _error_bucket: p.TokenBucket = field(init=False)
    _live_bucket: p.TokenBucket = field(init=False)
    _bad_messages: int = 0
    _pings: dict[int, int] = field(default_factory=dict)
    _next_ping_id: int = 0
    _next_ping_ns: int = 0
    _last_error_ns: int | None = None
    _unreported: Counter[str] = field(default_factory=Counter)
    _drain_deadline_ns: int | None = None

    def __post_init__(self) -> None:
        rate = self.limits.max_control_rate
        self._control_bucket = p.TokenBucket(rate, max(1.0, rate))
        self._error_bucket = p.TokenBucket(self.limits.max_error_rate, self.pacing.error_burst)
        self._live_bucket = p.TokenBucket(
            self.limits.max_live_control_rate, self.limits.live_control_burst
        )

    # --- inputs -------------------------------------------------------------------------------

    def control(self, data: bytes, now_ns: int) -> list[Action]:
        """Bytes from the control stream."""
        if self.state == "closed":
            return []
        self._reader.push(data)
        out: list[Action] = []
        while self.state != "closed":
            try:
                body = self._reader.next()
            except p.ProtocolError as exc:
                code = "hello_too_large" if self.state == "hello" else exc.code
                out += self._fatal(code, str(exc))
                break
            if body is None:
                break
            if not self._control_bucket.allow(now_ns / NS):
                rate = self.limits.max_control_rate
                out += self._bad("control_rate", f"over {rate:g} control messages/s", now_ns)
                continue
            try:
                msg = p.parse_client(body)
            except p.ProtocolError as exc:
                self.counters["control_invalid"] += 1
                if self.state == "hello":  # not a hello either: nothing to be lenient about
                    out += self._fatal("expected_hello", f"the first message must be hello: {exc}")
                    break
                refused = self._invalid_control(body, exc)
                out += refused if refused is not None else self._bad(exc.code, str(exc), now_ns)
                continue
            out += self._on_message(msg, now_ns)
        return out

    def control_closed(self) -> list[Action]:
        """The client ended its control stream: the session is over."""
        return self._close("control stream closed")

    def datagram(self, data: bytes, now_ns: int) -> list[Action]:
        if self.state == "closed":
            return []
        if self.state == "hello" or self.session_id is None:
            # No client sends reports before its answer: each one is a bad message.
            self.counters["invalid_before_hello"] += 1
            return self._bad("before_hello", "a datagram before hello", now_ns)
        try:
            report = p.decode_report(data)
        except p.ProtocolError as exc:
            return self._reject(exc.code, str(exc), now_ns)
        assert self._bucket is not None
        if not self._bucket.allow(now_ns / NS):
            return self._reject("rate", f"over {self.limits.max_report_rate:g} reports/s", now_ns)
        t_recv = self.clock.to_server_ns(report.t_recv_ms)
        t_an = self.clock.to_server_ns(report.t_analysed_ms)
        try:
            msg = schemas.build(
                schemas.Centroid,
                session_id=self.session_id,
                rtp_ts=report.rtp_ts,
                detected=report.detected,
                x=report.x,
                y=report.y,
                t_browser_recv_ns=t_recv,
                t_browser_analysed_ns=t_an,
                t_router_recv_ns=now_ns,
                t_published_ns=now_ns,  # restamped by the shell right before it publishes
                clock_offset_ns=self.clock.offset_ns,
                clock_error_ns=self.clock.error_ns(now_ns),
            )
        except schemas.SchemaError as exc:  # e.g. a time that converts below zero
            return self._reject("schema", str(exc), now_ns)
        self.counters["reports_accepted"] += 1
        return [Publish(msg)]

    def tick(self, now_ns: int) -> list[Action]:
        """Periodic: hello timeout, clock pings."""
        if self.state == "closed":
            return []
        if self.state == "hello":
            if now_ns - self.created_ns > self.limits.hello_timeout_s * NS:
                return self._fatal("hello_timeout", "no hello within the time limit")
            return []
        deadline = self._drain_deadline_ns
        if self.state == "draining" and deadline is not None and now_ns >= deadline:
            self.counters["ended_incomplete"] += 1
            return self._end(p.End(complete=False), now_ns)
        if self.state == "ending":
            if deadline is not None and now_ns >= deadline:
                return self._close("the client did not close after end")
            return []
        out: list[Action] = []
        if now_ns >= self._next_ping_ns:
            out.append(self._ping(now_ns))
            early = self.clock.samples < self.pacing.initial_pings
            self._next_ping_ns = now_ns + int((0.05 if early else self.limits.ping_interval_s) * NS)
        return out

    def results_done(self, frames_due: int, now_ns: int, reason: str = "") -> list[Action]:
        """The tracker has sent every frame due's result (``SessionResults``): end the session.

        Also when the stream stopped without a bye (the simulator ended it: connect timeout,
        peer failed, shutdown): ``end`` then carries the simulator's ``reason``, so the client
        knows why its video stopped instead of watching it freeze, and its counts are complete
        either way.
        """
        if self.state not in ("active", "draining"):
            return []
        self.counters["ended_complete"] += 1
        why = ""
        if self.state == "active":  # no bye: the simulator stopped on its own
            self.counters["ended_by_simulator"] += 1
            why = reason or STOPPED_BY_SIMULATOR
        return self._end(p.End(complete=True, frames_due=frames_due, reason=why), now_ns)

    def notify(self, status: p.Status) -> list[Action]:
        """Tell the client a part it depends on is degraded or back (once it has said hello)."""
        if self.state in ("hello", "closed"):
            return []
        self.counters["status_sent"] += 1
        return [SendControl(p.frame(status))]

    def _end(self, end: p.End, now_ns: int) -> list[Action]:
        self.state = "ending"
        self._drain_deadline_ns = now_ns + int(self.pacing.end_linger_s * NS)
        return [SendControl(p.frame(end), final=True)]

    def relay_done(
        self, answer_sdp: str, codec: str, params: SessionParams, warning: str = ""
    ) -> list[Action]:
        """The simulator's answer; ``warning``: why the session's L2 may be wrong (passed on)."""
        if self.state != "negotiating":
            return []
        self.state, self.codec, self.params = "active", codec, params
        answer = p.Answer(sdp=answer_sdp, codec=codec, params=params, warning=warning[:500])
        return [SendControl(p.frame(answer))]

    def relay_failed(self, code: str, message: str) -> list[Action]:
        """The simulator refused or was unreachable: tell the client; it may offer again.

        Always told (one answer per offer, and offers wait for each other). A refusal of the
        client's own making (``simulator_4xx``, e.g. an offer that cannot receive H.264) counts
        as a bad message: each offer costs the simulator a request.
        """
        if self.state != "negotiating":
            return []
        self.state = "ready"
        self.counters[f"relay_{code}"] += 1
        out: list[Action] = [SendControl(p.frame(p.Error(code=code, message=message)))]
        if code.startswith("simulator_4"):
            self._bad_messages += 1
            if self._bad_messages >= self.limits.max_bad_messages:
                out += self._too_many(message)
        return out

    def control_done(self, control_id: int, answer: SessionState) -> list[Action]:
        """The simulator took the control: what is in force now goes back in the ack."""
        if self.control_in_flight != control_id:
            return []
        self.control_in_flight = None
        self.stream_state, self.phase, self.params = answer.state, answer.phase, answer.params
        self.counters["live_control_ok"] += 1
        if self.state == "closed":
            return []
        ack = p.ControlAck(
            id=control_id, ok=True, state=answer.state, phase=answer.phase, params=answer.params,
            warning=answer.warning[:500],
        )  # fmt: skip
        return [SendControl(p.frame(ack))]

    def control_failed(self, control_id: int, outcome: str, error: str) -> list[Action]:
        """The simulator refused the control (``refused``: its 4xx, whose detail names the field)
        or could not be asked (``unavailable``): nothing changed, and the client is told why."""
        if self.control_in_flight != control_id:
            return []
        self.control_in_flight = None
        return self._refuse_control(control_id, outcome, error)

    # --- internals ----------------------------------------------------------------------------

    def _on_stats(self, msg: p.BrowserStats, now_ns: int) -> list[Action]:
        """Kept for the metrics, and published beside the reports, so the tracker's report can
        put the quality the browser saw (decoded fps, freezes, bytes) beside L2 and latency."""
        self.stats = msg
        if self.session_id is None:
            return []
        fields = msgspec.structs.asdict(msg)
        try:
            record = schemas.build(
                schemas.ClientStats, session_id=self.session_id, t_router_recv_ns=now_ns, **fields
            )
        except schemas.SchemaError:  # the two schemas' bounds agree: not seen, but never a crash
            self.counters["client_stats_invalid"] += 1
            return []
        self.counters["client_stats"] += 1
        return [PublishStats(record)]

    def _on_control(self, msg: p.Control, now_ns: int) -> list[Action]:
        """Relay a live control to the simulator, or refuse it at once (answered either way)."""
        if self.state in ("ready", "negotiating"):
            why = "the offer is not answered yet"
            return self._refuse_control(msg.id, NO_STREAM, f"{NO_STREAM}: {why}")
        if self.state != "active":
            return self._refuse_control(msg.id, ENDING, f"{ENDING}: the session is ending")
        if self.control_in_flight is not None:
            why = f"control {self.control_in_flight} is still in flight; wait for its ack"
            return self._refuse_control(msg.id, BUSY, f"{BUSY}: {why}")
        if not self._live_bucket.allow(now_ns / NS):
            rate = self.limits.max_live_control_rate
            return self._refuse_control(msg.id, RATE, f"{RATE}: over {rate:g} controls/s")
        assert self.session_id is not None
        self.control_in_flight = msg.id
        return [RelayControl(self.session_id, msg.id, msg.set)]

    def _invalid_control(self, body: bytes, exc: p.ProtocolError) -> list[Action] | None:
        """A control whose ``set`` does not validate, answered with an ack naming the field
        (``fps: Expected `float` <= 240``) rather than a generic error: a person typed it in the
        page, and it never reaches the simulator. None if ``body`` is not a control with an id."""
        try:
            head = msgspec.json.decode(body, type=_ControlId)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
        if head.type != "control" or not 0 <= head.id <= 2**31:
            return None
        why = str(exc).removeprefix("invalid control message: ")
        at = _FIELD_AT.match(why)
        if at is not None:
            why = f"{at['field']}: {at['why']}" if at["field"] else at["why"]
        return self._refuse_control(head.id, "invalid", why)

    def _refuse_control(self, control_id: int, outcome: str, error: str) -> list[Action]:
        self.counters[f"live_control_{outcome.replace(' ', '_')}"] += 1
        if self.state == "closed":
            return []
        ack = p.ControlAck(id=control_id, ok=False, error=error[:500])
        return [SendControl(p.frame(ack))]

    def _on_message(self, msg: p.ClientMessage, now_ns: int) -> list[Action]:
        self.counters[f"control_{type(msg).__name__.lower()}"] += 1
        if isinstance(msg, p.Hello):
            if self.state != "hello":
                return self._bad("duplicate_hello", "hello was already received", now_ns)
            self.session_id, self.params, self.client = msg.session_id, msg.params, msg.client
            self.state = "ready"
            self._reader.max_bytes = p.MAX_CONTROL_BYTES
            self._bucket = p.TokenBucket(self.limits.max_report_rate, self.limits.report_burst)
            welcome = p.Welcome(
                session_id=msg.session_id, max_report_rate=self.limits.max_report_rate
            )
            self._next_ping_ns = now_ns + int(0.05 * NS)
            return [SendControl(p.frame(welcome)), self._ping(now_ns)]
        if self.state == "hello":
            return self._fatal("expected_hello", "the first message must be hello")
        if isinstance(msg, p.Offer):
            if self.state == "negotiating":
                return self._bad("busy", "an offer is already being answered", now_ns)
            if self.state in ("active", "draining", "ending"):
                return self._bad("already_active", "this session already has its video", now_ns)
            self.state = "negotiating"
            assert self.session_id is not None
            return [RelayOffer(self.session_id, msg.sdp, self.params)]
        if isinstance(msg, p.Pong):
            sent = self._pings.pop(msg.id, None)
            if sent is None:
                # A pong to a ping given up on (16 outstanding): a client that stalled for 8 s
                # answers late, which is no fault; counted, not answered.
                self.counters["pong_unknown"] += 1
                return []
            self.clock.add(sent, msg.t_client_ms, now_ns)
            return [
                SendControl(
                    p.frame(
                        p.ClockEstimate(
                            offset_ms=self.clock.offset_ns / 1e6, rtt_ms=self.clock.rtt_ns / 1e6
                        )
                    )
                )
            ]
        if isinstance(msg, p.BrowserStats):
            return self._on_stats(msg, now_ns)
        if isinstance(msg, p.Control):
            return self._on_control(msg, now_ns)
        # Bye
        if self.state in ("draining", "ending"):
            return []
        if self.state != "active" or self.session_id is None:
            return self._close("client said bye")
        self.state = "draining"
        self._drain_deadline_ns = now_ns + int(self.limits.drain_timeout_s * NS)
        return [StopStream(self.session_id)]

    def _ping(self, now_ns: int) -> SendControl:
        pid = self._next_ping_id
        self._next_ping_id += 1
        self._pings[pid] = now_ns
        while len(self._pings) > 16:  # unanswered pings are not kept forever
            del self._pings[min(self._pings)]
        return SendControl(p.frame(p.Ping(id=pid, t_server_ns=now_ns)))

    # --- typed channels (carom_router.channels decides; these tell the client) ----------------

    @property
    def takes_channels(self) -> bool:
        """Channel messages are taken once the session said hello, until it is closed."""
        return self.state not in ("hello", "closed")

    def refuse_channel(
        self, code: str, message: str, now_ns: int, counter: str = "channel_refused"
    ) -> list[Action]:
        """A channel message refused: told like a rejected datagram (rate-limited, summed up).

        ``counter="invalid"``: a channel datagram that is not a frame, counted with the other
        rejected datagrams."""
        if self.state == "closed":
            return []
        return self._reject(code, message, now_ns, counter=counter)

    def bad(self, code: str, message: str, now_ns: int) -> list[Action]:
        """A bad message outside the control stream (a channel stream that is not frames)."""
        if self.state == "closed":
            return []
        return self._bad(code, message, now_ns)

    def fatal(self, code: str, message: str) -> list[Action]:
        """Close the session with a fatal error (a channel's ``on_overflow: close``)."""
        if self.state == "closed":
            return []
        return self._fatal(code, message)

    def _reject(
        self, code: str, message: str, now_ns: int, counter: str = "invalid"
    ) -> list[Action]:
        """Count a bad datagram; tell the client at a bounded rate, never once per datagram."""
        self.counters[f"{counter}_{code}"] += 1
        self._unreported[code] += 1
        interval = int(self.pacing.error_interval_s * NS)
        if self._last_error_ns is not None and now_ns - self._last_error_ns < interval:
            return []
        if not self._error_bucket.allow(now_ns / NS):  # the summary waits for the next one
            return []
        self._last_error_ns = now_ns
        summary = ", ".join(f"{n} {c}" for c, n in sorted(self._unreported.items()))
        self._unreported.clear()
        return [SendControl(p.frame(p.Error(code=code, message=f"{message} (dropped: {summary})")))]

    def _bad(self, code: str, message: str, now_ns: int) -> list[Action]:
        """A bad or unexpected message: an error reply (rate-limited), or, at the limit, the end."""
        self._bad_messages += 1
        self.counters[f"error_{code}"] += 1
        if self._bad_messages >= self.limits.max_bad_messages:
            return self._too_many(message)
        if not self._error_bucket.allow(now_ns / NS):
            self.counters["errors_suppressed"] += 1
            return []
        return [SendControl(p.frame(p.Error(code=code, message=message)))]

    def _too_many(self, last: str) -> list[Action]:
        n = self._bad_messages
        return self._fatal(
            "too_many_errors",
            f"{n} bad or unexpected control messages (the last: {last}); closing the session",
            close_code=p.CLOSE_TOO_MANY_ERRORS,
        )

    def _fatal(
        self, code: str, message: str, close_code: int = p.CLOSE_PROTOCOL_ERROR
    ) -> list[Action]:
        self.counters[f"fatal_{code}"] += 1
        frame_ = p.frame(p.Error(code=code, message=message, fatal=True))
        return [SendControl(frame_), *self._close(message, code=close_code)]

    def _close(self, reason: str, code: int = p.CLOSE_NORMAL) -> list[Action]:
        if self.state == "closed":
            return []
        self.state = "closed"
        # Nothing more is read or answered: let go of what a flood may have left buffered.
        self._reader.clear()
        self._pings.clear()
        self._unreported.clear()
        return [Close(reason, code)]
