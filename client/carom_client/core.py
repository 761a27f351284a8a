"""The client's side of a Carom session (docs/protocol.md), without I/O.

The mirror of the router's ``carom_router.session.SessionCore``: it is fed what arrived (a
control message, a result datagram, a decoded frame to report) and says what to do (a control
message to send back, the answer to apply, a refusal); it keeps what the session learnt (the
clock estimate, statuses, the end, every live result) and counts what it refused. The shell
(``carom_client.session.CaromSession``) owns the WebTransport session, the video and the tasks,
and is the only part that waits. The page runs the same protocol in JavaScript.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from carom import accounting
from carom import protocol as p
from carom.signaling import SessionControl, SessionParams, StreamState

State = Literal["negotiating", "streaming", "ended"]


@dataclass(frozen=True)
class Reply:
    """Send this control message to the router."""

    message: p.ClientMessage


@dataclass(frozen=True)
class Answered:
    """The router relayed the simulator's answer: apply it to the video."""

    answer: p.Answer


@dataclass(frozen=True)
class Refused:
    """The session failed before it was answered (``code`` as in docs/protocol.md)."""

    code: str
    message: str


@dataclass(frozen=True)
class Acked:
    """The router answered the control with this id (in force, or why not)."""

    ack: p.ControlAck


Action = Reply | Answered | Refused | Acked


@dataclass
class ClientCore:
    """One session's protocol state, from hello to the router's ``end``."""

    session_id: str
    params: SessionParams = field(default_factory=SessionParams)
    client: str = "carom-py"
    #: Live results kept for ``coverage`` and callers (bounded: a long session would grow).
    keep_results: int = 100_000
    state: State = "negotiating"
    answer: p.Answer | None = None
    clock: p.ClockEstimate | None = None
    #: The router's last word: how many frames were due, and why the video stopped if the
    #: simulator stopped it on its own.
    end: p.End | None = None
    #: Every ``status`` with the caller's wall time (s) when it was read.
    statuses: list[tuple[float, p.Status]] = field(default_factory=list)
    errors: list[p.Error] = field(default_factory=list)
    results: list[p.LiveResult] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    #: The stream's state and phase as the last successful ``control_ack`` said (the answer's
    #: phase is 0, streaming).
    stream_state: StreamState = "streaming"
    phase: int = 0
    _seq: int = 0
    _next_control: int = 0

    def hello(self) -> p.Hello:
        return p.Hello(session_id=self.session_id, params=self.params, client=self.client)

    def live_control(self, change: SessionControl) -> p.Control:
        """The ``control`` message for ``change``, numbered in order (its ack has the same id)."""
        msg = p.Control(id=self._next_control, set=change)
        self._next_control += 1
        return msg

    def control(self, msg: p.RouterMessage, now_ms: float, now_s: float) -> list[Action]:
        """A control message from the router; ``now_ms``/``now_s`` are this machine's wall clock
        (ms for a pong, which the router's clock estimate reads; s to stamp statuses)."""
        self.counters[f"control_{type(msg).__name__.lower()}"] += 1
        if isinstance(msg, p.Ping):
            return [Reply(p.Pong(id=msg.id, t_client_ms=now_ms))]
        if isinstance(msg, p.Answer):
            if self.answer is not None:
                return []  # one answer per session; a second is ignored
            self.answer = msg
            self.state = "streaming"
            return [Answered(msg)]
        if isinstance(msg, p.ControlAck):
            if msg.ok and msg.state is not None and msg.phase is not None:
                self.stream_state, self.phase = msg.state, msg.phase
                if msg.params is not None:
                    self.params = msg.params
            return [Acked(msg)]
        if isinstance(msg, p.ClockEstimate):
            self.clock = msg
        elif isinstance(msg, p.End):
            self.end = msg
            self.state = "ended"
        elif isinstance(msg, p.Status):
            self.statuses.append((now_s, msg))
        elif isinstance(msg, p.Error):
            self.errors.append(msg)
            if self.answer is None:
                return [Refused(msg.code, msg.message)]
        return []

    def closed(self, why: str = "the router closed the session") -> list[Action]:
        """The control stream ended: a session not answered yet has failed."""
        was = self.state
        self.state = "ended"
        return [Refused("closed", why)] if self.answer is None and was != "ended" else []

    def report(
        self, rtp_ts: int, centroid: tuple[float, float] | None, t_recv_ms: float,
        t_analysed_ms: float,
    ) -> bytes:  # fmt: skip
        """The report datagram of one decoded frame (numbered in order, as the page does)."""
        data = p.encode_report(self._seq, rtp_ts, centroid, t_recv_ms, t_analysed_ms)
        self._seq += 1
        return data

    def result(self, data: bytes) -> p.LiveResult | None:
        """A result datagram from the router; None (and counted) if it is not one."""
        try:
            live = p.decode_result(data)
        except p.ProtocolError:
            self.counters["bad_datagrams"] += 1
            return None
        if len(self.results) < self.keep_results:
            self.results.append(live)
        return live

    @property
    def degraded(self) -> dict[str, str]:
        """Parts the router last said were degraded, with its detail (empty: all well)."""
        now: dict[str, str] = {}
        for _, status in self.statuses:
            if status.state == "degraded":
                now[status.part] = status.detail
            else:
                now.pop(status.part, None)
        return now

    def results_in(self) -> bool:
        """Every frame due has its result (after ``end``; results are datagrams and may trail)."""
        due = self.end.frames_due if self.end is not None else None
        return due is not None and len({r.frame for r in self.results}) >= due

    def coverage(self) -> accounting.Coverage | None:
        """The frames due and their fate from the live results (None before ``end``).

        Defined as the tracker's report defines it (``carom.accounting``), so the two agree when
        no result datagram was lost; a lost one shows as "no row".
        """
        if self.end is None or self.end.frames_due is None:
            return None
        by_frame = {r.frame: r.status for r in self.results}
        return accounting.count(
            ((f, s) for f, s in by_frame.items() if s != "orphan"),  # type: ignore[misc]
            self.end.frames_due,
        )
