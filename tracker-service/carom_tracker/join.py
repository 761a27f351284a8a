"""The frame-exact join of truth and centroid reports, as a sans-I/O state machine.

The tracker reads two topics: one ``Truth`` per rendered frame and one ``Centroid`` per frame the
browser analysed. ``Joiner`` pairs them on ``(session_id, rtp_ts)`` and says what became of every
message it was given. It has no sockets, no asyncio and no clock: the caller passes ``now_ns``
(epoch ns, server clock) into every call, so the whole join is replayable in a test.

Vocabulary:

- *window*: how long a message waits for its partner, from the call that added it. A partner
  added strictly less than ``window_ns`` later joins (in either order); from then on the truth is
  ``missed`` and the report an ``orphan``. The clock used is the largest ``now_ns`` seen, so a
  wall clock stepping back delays nothing and revives nothing; ``hold_clock`` can hold it back
  (stream time while draining a backlog).
- *finalised*: a key that produced its row (joined, missed or orphan). Later arrivals for it are
  duplicates (that kind was already consumed) or late (the partner of a missed/orphan key). They
  never produce a second row and their tokens come back in ``Batch.acks``, with one exception: a
  truth arriving after its report was given up as an orphan is the frame's first row, ``missed``
  (orphans are not frames: only a truth makes a frame, and every truth makes exactly one row).
- *not sent*: a ``NotSent`` frame (due, never sent) is final at once: its row is ``not_sent``
  with the simulator's reason. Its key is remembered like a joined frame's.
- *session end*: a ``SessionEnd`` comes after every truth of its session (same producer, same
  key). It is answered in ``Batch.ended`` as soon as that session has no truth waiting, i.e. once
  every frame due has produced its row; its token is acked with that batch.
- *token*: whatever the caller attached to a message (e.g. the Pulsar message id). Every token
  handed in comes back exactly once: in ``Result.tokens`` (ack once the row is durable), in
  ``Batch.acks`` (nothing to write; ack) or, only from ``flush_all``, in ``Batch.unjoined``
  (do not ack, so the broker redelivers it to the next tracker).

Each call first finalises everything whose window has run out at ``now_ns``, so the outcome of a
sequence of calls does not depend on how often the caller's timer calls ``expire``. Results of one
call come in a fixed order: window expiries (in consumption order), then entries evicted to make
room, then the outcome of the message just added.

Frame identity is the raw ``rtp_ts``: it is only compared for equality and nothing is ordered by
it, so the 2**32 wrap needs no special case. A value repeats only after ~13 h at 90 kHz, far beyond
any window or finalised-key memory.

Memory is bounded. Waiting messages: at most ``max_sessions`` sessions with something waiting
(the least recently active is evicted whole), each with at most ``max_pending`` waiting truths and
as many waiting reports (the oldest of that kind goes first, so a flood of unmatched reports cannot
push out waiting truths). Evicted messages are finalised early (missed/orphan, ``evicted=True``)
and counted in ``evicted_over_cap``. Finalised keys: at most ``max_finalised`` across all sessions,
each kept ``finalised_ttl_ns``; this memory outlives a session's eviction, so its stragglers are
still recognised. A duplicate arriving after its key was forgotten is not recognised and starts a
new wait: size the TTL above the broker's redelivery delay.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from carom.schemas import Centroid, FrameResult, NotSent, SessionEnd, SessionResults, Truth

ResultStatus = Literal["ok", "not_detected", "missed", "not_sent", "orphan"]
"""``ok``/``not_detected``/``missed``/``not_sent`` as in ``carom.schemas.Status``; ``orphan``: a
report whose truth never came (no truth fields, and no ``FrameResult``)."""

Key = tuple[str, int]
"""``(session_id, rtp_ts)``: one frame."""
Incoming = tuple[Truth | Centroid | NotSent | SessionEnd, object, int | None, int | None]
"""What ``Joiner.add_many`` takes per message: (message, token, consumed_ns, event_ns)."""

_TRUTH: Final = 1
_REPORT: Final = 2

_COUNTERS: Final = (
    "truth_in",
    "reports_in",
    "joined_ok",
    "not_detected",
    "missed",
    "not_sent",
    "orphans",
    "duplicate_truth",
    "duplicate_reports",
    "late_truth",
    "late_reports",
    "evicted_over_cap",
    "sessions_evicted",
    "unjoined_at_shutdown",
    "sessions_ended",
)


class FrameRow(msgspec.Struct, frozen=True, kw_only=True):
    """One frame's result as the tracker records it: the one declaration of its fields.

    A struct, not a dataclass: the join builds one per frame, and a frozen dataclass's
    ``__init__`` sets each of its 20-odd fields through ``object.__setattr__`` (measured here:
    10.8 us per ``Result``, 2.8 us as a struct), the largest single cost of a joined frame.

    Every CSV column is one of these fields (``carom_tracker.csvrow`` formats them, in this
    order, with the derived per-hop latencies after the last timestamp), and a row read back from
    a file is one again (``csvrow.Row``). The result published on the errors topic,
    ``carom.schemas.FrameResult``, is the projection onto ``WIRE_FIELDS`` (``Result.
    to_error_result``; an orphan has no frame and is never published); the rest, ``LOCAL_FIELDS``,
    stay in the CSV. A field added here must be put in one of the two (the module checks it on
    import), and one added to ``FrameResult`` must exist here.
    """

    session_id: str
    frame: int | None = None
    "Simulator frame counter; None for an orphan."
    rtp_ts: int
    status: ResultStatus
    truth_x: float | None = None
    "Where the ball was; None for an orphan or a frame not sent."
    truth_y: float | None = None
    x: float | None = None
    "Where the browser saw it; None when nothing was detected (or there is no report)."
    y: float | None = None
    l2: float | None = None
    "Euclidean error in pixels; None unless ``ok`` (a non-detection is never 0 error)."
    t_render_ns: int | None = None
    "When the frame was rendered; for ``not_sent``, when it was due; None for an orphan."
    t_browser_recv_ns: int | None = None
    t_browser_analysed_ns: int | None = None
    t_router_recv_ns: int | None = None
    t_published_ns: int | None = None
    t_tracker_consumed_ns: int | None = None
    "The later of the truth's and the report's consumption times; None unless both came."
    t_computed_ns: int | None
    """``now_ns`` of the join call that decided the row (for missed/orphan: when it gave up).
    Always set by the join; None only in a file row whose cell is empty."""
    reason: str | None = None
    """Why a frame has no L2: ``late`` (not sent), ``no_report``/``memory_cap``/``truth_late``
    (missed), ``memory_cap`` (an orphan evicted); else None."""
    clock_error_ns: int | None = None
    "The report's clock-offset error bound: its browser times are right to within this."
    latency: str | None = None
    "The playout mode the frame was sent in (``carom.schemas.Latency``); None for an orphan."
    phase: int | None = None
    """The session's phase the frame was due in (``carom.schemas.PhaseSummary``: the parameters
    in force); None for an orphan."""
    width: int | None = None
    """The frame's width in pixels, from its truth: the geometry its positions and L2 are in (a
    session can change resolution mid-stream). None for a frame not sent, an orphan, or a truth
    from a simulator that did not say."""
    height: int | None = None


WIRE_FIELDS: Final = tuple(n for n in FrameResult.__struct_fields__ if n != "schema_version")
"""The ``FrameRow`` fields a ``FrameResult`` carries, in its order (not its ``schema_version``)."""
LOCAL_FIELDS: Final = ("reason", "clock_error_ns", "latency", "phase", "width", "height")
"""The ``FrameRow`` fields kept out of ``FrameResult``, so that its wire format stays as it is:
every message of the contract forbids unknown fields, so a router still on the schema without
them would reject every result that carried them. They reach the CSV only."""
ROW_FIELDS: Final = FrameRow.__struct_fields__
"""``FrameRow``'s fields in order: the CSV's columns (``csvrow``); ``WIRE_FIELDS`` are some."""
if sorted(ROW_FIELDS) != sorted((*WIRE_FIELDS, *LOCAL_FIELDS)):
    raise TypeError(
        f"FrameRow fields {ROW_FIELDS} are not FrameResult's {WIRE_FIELDS} and {LOCAL_FIELDS}"
    )


class Result(FrameRow, frozen=True, kw_only=True):
    """What the join decided for one frame: its row, and which messages to ack once it is durable.

    The fields below are the join's own bookkeeping: they are neither in the CSV nor published.
    """

    tokens: tuple[object, ...]
    "Tokens of the messages behind this row (truth first): ack them once the row is durable."
    t_truth_consumed_ns: int | None = None
    "When the truth was consumed, if it was."
    t_report_consumed_ns: int | None = None
    "When the report was consumed, if it was."
    evicted: bool = False
    "Finalised before its window ran out because a memory cap was reached."

    def to_error_result(self) -> FrameResult | None:
        """The message for the error topic; None for an orphan, which has no frame to report."""
        if self.status == "orphan":
            return None
        assert self.frame is not None and self.t_render_ns is not None
        return FrameResult(**{name: getattr(self, name) for name in WIRE_FIELDS})


@dataclass(frozen=True, slots=True)
class Ended:
    """Every frame due of a session has its row: publish ``message`` after them, ack ``token``."""

    message: SessionResults
    token: object


@dataclass(frozen=True, slots=True)
class Unjoined:
    """A message still waiting at shutdown: leave it unacknowledged so a restart sees it again."""

    message: Truth | Centroid | SessionEnd
    token: object
    t_consumed_ns: int


@dataclass(slots=True)
class Batch:
    """Everything one call decided."""

    results: list[Result] = field(default_factory=list)
    "Rows to write; ack each one's ``tokens`` once it is durable."
    acks: list[object] = field(default_factory=list)
    "Tokens of duplicate or late messages: no row, ack them."
    unjoined: list[Unjoined] = field(default_factory=list)
    "Only from ``flush_all``: do not ack (a negative ack gets them redelivered sooner)."
    ended: list[Ended] = field(default_factory=list)
    "Sessions whose every frame due now has its row (after this batch's results)."

    def ack_tokens(self) -> list[object]:
        """Every token to acknowledge once this batch's rows are durable."""
        out = [t for r in self.results for t in r.tokens]
        out.extend(self.acks)
        out.extend(e.token for e in self.ended)
        return out


@dataclass(slots=True)
class _Pending:
    message: Truth | Centroid
    token: object
    consumed_ns: int
    deadline_ns: int
    seq: int


class _Session:
    """The messages of one session still waiting for their partner, oldest first per kind."""

    __slots__ = ("reports", "truths")

    def __init__(self) -> None:
        self.truths: OrderedDict[int, _Pending] = OrderedDict()
        self.reports: OrderedDict[int, _Pending] = OrderedDict()


class Joiner:
    """Pairs truth and reports per frame; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        window_ns: int = 2_000_000_000,
        max_sessions: int = 64,
        max_pending: int = 256,
        max_finalised: int = 65_536,
        finalised_ttl_ns: int = 120_000_000_000,
    ) -> None:
        for name, value in (
            ("window_ns", window_ns),
            ("max_sessions", max_sessions),
            ("max_pending", max_pending),
            ("max_finalised", max_finalised),
            ("finalised_ttl_ns", finalised_ttl_ns),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be at least 1, got {value}")
        self.window_ns = window_ns
        self.max_sessions = max_sessions
        self.max_pending = max_pending
        self.max_finalised = max_finalised
        self.finalised_ttl_ns = finalised_ttl_ns
        # Sessions with a waiting message, least recently active first.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        # Every waiting message in arrival order. Deadlines come from the clamped clock, so this
        # is also deadline order and expiry only ever looks at the front. (With ``event_ns``
        # under a held clock a later arrival can have an earlier deadline: it then waits for the
        # front, a little longer than its window, never less.)
        self._waiting: OrderedDict[Key, _Pending] = OrderedDict()
        # Finalised keys -> when << 2 | kinds consumed (one int: this map is the bulk of the
        # memory), oldest first, for all sessions together: it outlives a session's eviction, so
        # a straggler of an evicted session is still recognised.
        self._done: OrderedDict[Key, int] = OrderedDict()
        self._now = 0  # the window clock: the largest now_ns seen, held back by hold_clock
        self._limit: int | None = None  # see ``hold_clock``
        self._seq = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        # Sessions whose SessionEnd came while a truth of theirs still waited: (message, token).
        self._ends: dict[str, tuple[SessionEnd, object]] = {}

    # -- inputs -------------------------------------------------------------------------------

    def add_truth(
        self,
        truth: Truth,
        now_ns: int,
        token: object = None,
        *,
        consumed_ns: int | None = None,
        event_ns: int | None = None,
    ) -> Batch:
        """Take one truth message.

        ``consumed_ns`` is when the glue received it from the broker (default ``now_ns``); give it
        when messages queue between the consumer and the join, so that wait shows up in
        ``tracker_to_computed`` instead of vanishing. ``event_ns``: when it was published; its
        wait starts there if the clock is held behind it (see ``hold_clock``).
        """
        return self.add_many(((truth, token, consumed_ns, event_ns),), now_ns)

    def add_report(
        self,
        report: Centroid,
        now_ns: int,
        token: object = None,
        *,
        consumed_ns: int | None = None,
        event_ns: int | None = None,
    ) -> Batch:
        """Take one centroid report; ``consumed_ns`` and ``event_ns`` as for ``add_truth``."""
        return self.add_many(((report, token, consumed_ns, event_ns),), now_ns)

    def add_not_sent(self, msg: NotSent, now_ns: int, token: object = None) -> Batch:
        """Take a frame that was due but never sent: its ``not_sent`` row comes out at once."""
        return self.add_many(((msg, token, None, None),), now_ns)

    def add_end(self, msg: SessionEnd, now_ns: int, token: object = None) -> Batch:
        """Take a session's end: answered in ``Batch.ended`` once its last frame has its row."""
        return self.add_many(((msg, token, None, None),), now_ns)

    def add_many(self, items: Iterable[Incoming], now_ns: int) -> Batch:
        """Take several messages, each ``(message, token, consumed_ns, event_ns)``, at one
        ``now_ns``: what calling ``add_truth``/``add_report``/``add_not_sent``/``add_end`` for
        each in turn with that ``now_ns`` gives, in one ``Batch`` (those four are this with one
        message, which looks at the whole clock before it; a test holds the two ways equal).

        The clock moves once, before the first. After that only the front of the arrival order
        is looked at again before each message: a join or an eviction may have taken the front
        away and uncovered a wait that had already run out behind it (see ``_waiting``); nothing
        else can have run out with the clock standing still, and finalised keys are forgotten in
        the order they were stamped. The tracker joins what it received in one go this way; per
        message, the whole look and a ``Batch`` were a sixth of its join thread while draining.
        """
        batch = Batch()
        self._advance(now_ns, batch)
        first = True
        for msg, token, consumed_ns, event_ns in items:
            if not first:
                self._expire_front(now_ns, batch)
            first = False
            if isinstance(msg, Truth):
                self._take(msg, _TRUTH, token, now_ns, consumed_ns, event_ns, batch)
            elif isinstance(msg, Centroid):
                self._take(msg, _REPORT, token, now_ns, consumed_ns, event_ns, batch)
            elif isinstance(msg, NotSent):
                self._not_sent(msg, token, now_ns, batch)
            else:
                self._end(msg, token, now_ns, batch)
        return batch

    def _not_sent(self, msg: NotSent, token: object, now_ns: int, batch: Batch) -> None:
        self._counts["truth_in"] += 1
        key = (msg.session_id, msg.rtp_ts)
        waiting = self._waiting.get(key)
        if key in self._done or (waiting is not None and isinstance(waiting.message, Truth)):
            self._counts["duplicate_truth"] += 1
            batch.acks.append(token)
        else:
            if waiting is not None:  # a report for a frame never sent: nothing to pair it with
                self._counts["late_reports"] += 1
                batch.acks.append(self._unwait(key).token)
            self._counts["not_sent"] += 1
            self._remember(key, _TRUTH)  # a report for it later is late, never a pair
            batch.results.append(_alone(msg, token, now_ns, now_ns, reason=msg.reason))
        self._check_ends(now_ns, batch)

    def _end(self, msg: SessionEnd, token: object, now_ns: int, batch: Batch) -> None:
        previous = self._ends.get(msg.session_id)
        if previous is not None:  # a redelivery (or a second end): keep one, ack the other
            batch.acks.append(previous[1])
        self._ends[msg.session_id] = (msg, token)
        self._check_ends(now_ns, batch)

    def hold_clock(self, limit_ns: int | None) -> None:
        """Keep the window clock at or below ``limit_ns`` (None: follow ``now_ns`` freely).

        The caller's way to run windows on the streams' own time while it drains a backlog: with
        the limit at the oldest of the topics' newest publish times, a message waits a window of
        the other topic's progress, not of the wall clock, so a partner still queued behind it
        is never given up on. The clock never goes back; times written to rows stay ``now_ns``.
        """
        self._limit = limit_ns

    def expire(self, now_ns: int) -> Batch:
        """Finalise what has waited a full window; call it on a timer so idle sessions report."""
        batch = Batch()
        self._advance(now_ns, batch)
        if self._ends:
            self._check_ends(now_ns, batch)
        return batch

    def flush_all(self, now_ns: int) -> Batch:
        """Shut down: finalise what is due, hand back the rest unjoined, forget everything.

        Waiting messages are not declared missed: their partner may simply not have been
        consumed yet. They come back in ``Batch.unjoined``; left unacknowledged, the broker
        redelivers them to the next tracker, which joins them properly.
        """
        batch = Batch()
        self._advance(now_ns, batch)
        self._check_ends(now_ns, batch)
        for p in self._waiting.values():
            batch.unjoined.append(Unjoined(p.message, p.token, p.consumed_ns))
        for end, token in self._ends.values():
            batch.unjoined.append(Unjoined(end, token, now_ns))
        self._ends.clear()
        self._counts["unjoined_at_shutdown"] += len(batch.unjoined)
        self._sessions.clear()
        self._waiting.clear()
        self._done.clear()
        return batch

    # -- observation --------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Totals since start, plus gauges of what is held now (for metrics and logs).

        ``evicted_over_cap`` is a subset of ``missed`` + ``orphans``, and ``late_truth`` of
        ``missed``. Every message is accounted for: ``truth_in`` (``NotSent`` frames included) =
        ``joined_ok`` + ``not_detected`` + ``missed`` + ``not_sent`` + ``duplicate_truth`` +
        ``pending_truth`` + (unjoined truths); ``reports_in`` = ``joined_ok`` + ``not_detected``
        + ``orphans`` + ``duplicate_reports`` + ``late_reports`` + ``pending_reports`` +
        (unjoined reports).
        """
        out = dict(self._counts)
        out["pending_truth"] = sum(len(s.truths) for s in self._sessions.values())
        out["pending_reports"] = sum(len(s.reports) for s in self._sessions.values())
        out["sessions"] = len(self._sessions)
        out["finalised_keys"] = len(self._done)
        out["ends_pending"] = len(self._ends)
        return out

    # -- internals ----------------------------------------------------------------------------

    def _take(
        self,
        msg: Truth | Centroid,
        kind: int,
        token: object,
        now_ns: int,
        consumed: int | None,
        event_ns: int | None,
        batch: Batch,
    ) -> None:
        """One truth or report, the windows already looked at (``_advance``)."""
        self._counts["truth_in" if kind == _TRUTH else "reports_in"] += 1
        consumed_ns = now_ns if consumed is None else consumed
        key = (msg.session_id, msg.rtp_ts)
        done = self._done.get(key)
        waiting = self._waiting.get(key)
        waiting_kind = 0
        if waiting is not None:
            waiting_kind = _TRUTH if isinstance(waiting.message, Truth) else _REPORT
        if waiting_kind == kind or (done is not None and done & kind):
            self._counts["duplicate_truth" if kind == _TRUTH else "duplicate_reports"] += 1
            batch.acks.append(token)
        elif done is not None and isinstance(msg, Truth):
            # Its report was given up as an orphan: the frame still gets its one row, missed.
            self._counts["late_truth"] += 1
            self._counts["missed"] += 1
            self._remember(key, _TRUTH | _REPORT)
            batch.results.append(_alone(msg, token, consumed_ns, now_ns, reason="truth_late"))
        elif done is not None:
            self._counts["late_reports"] += 1
            batch.acks.append(token)
        elif waiting is not None:
            partner = self._unwait(key)
            other, other_token, other_ns = partner.message, partner.token, partner.consumed_ns
            if isinstance(msg, Truth):
                assert isinstance(other, Centroid)
                result = self._joined(msg, token, consumed_ns, other, other_token, other_ns, now_ns)
            else:
                assert isinstance(other, Truth)
                result = self._joined(other, other_token, other_ns, msg, token, consumed_ns, now_ns)
            self._remember(key, _TRUTH | _REPORT)
            batch.results.append(result)
        else:
            start = self._now if event_ns is None else max(self._now, min(event_ns, now_ns))
            self._wait(msg, kind, token, consumed_ns, now_ns, start + self.window_ns, batch)
        if self._ends:
            self._check_ends(now_ns, batch)

    def _wait(
        self,
        msg: Truth | Centroid,
        kind: int,
        token: object,
        consumed_ns: int,
        now_ns: int,
        deadline_ns: int,
        batch: Batch,
    ) -> None:
        sid = msg.session_id
        session = self._sessions.get(sid)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                self._evict_session(next(iter(self._sessions)), now_ns, batch)
            session = self._sessions[sid] = _Session()
        else:
            self._sessions.move_to_end(sid)
        mine = session.truths if kind == _TRUTH else session.reports
        if len(mine) >= self.max_pending:
            self._finalise_alone(next(iter(mine.values())), now_ns, batch, evicted=True)
            self._sessions[sid] = session  # back in if that emptied it; still most recent
        self._seq += 1
        p = _Pending(msg, token, consumed_ns, deadline_ns, self._seq)
        mine[msg.rtp_ts] = p
        self._waiting[(sid, msg.rtp_ts)] = p

    def _unwait(self, key: Key) -> _Pending:
        """Take a waiting message out of every index; drop its session if that was the last."""
        p = self._waiting.pop(key)
        session = self._sessions[key[0]]
        del (session.truths if isinstance(p.message, Truth) else session.reports)[key[1]]
        if not (session.truths or session.reports):
            del self._sessions[key[0]]
        return p

    def _joined(
        self,
        truth: Truth,
        truth_token: object,
        truth_ns: int,
        report: Centroid,
        report_token: object,
        report_ns: int,
        now_ns: int,
    ) -> Result:
        l2: float | None = None
        x = y = None
        if report.detected and report.x is not None and report.y is not None:
            x, y = report.x, report.y
            l2 = math.hypot(x - truth.x, y - truth.y)
            self._counts["joined_ok"] += 1
        else:
            self._counts["not_detected"] += 1
        return Result(
            session_id=truth.session_id,
            rtp_ts=truth.rtp_ts,
            status="ok" if l2 is not None else "not_detected",
            frame=truth.frame,
            truth_x=truth.x,
            truth_y=truth.y,
            x=x,
            y=y,
            l2=l2,
            t_render_ns=truth.t_render_ns,
            t_browser_recv_ns=report.t_browser_recv_ns,
            t_browser_analysed_ns=report.t_browser_analysed_ns,
            t_router_recv_ns=report.t_router_recv_ns,
            t_published_ns=report.t_published_ns,
            t_tracker_consumed_ns=max(truth_ns, report_ns),
            t_computed_ns=now_ns,
            tokens=(truth_token, report_token),
            t_truth_consumed_ns=truth_ns,
            t_report_consumed_ns=report_ns,
            clock_error_ns=report.clock_error_ns,
            latency=truth.latency,
            phase=truth.phase,
            width=truth.width,
            height=truth.height,
        )

    def _advance(self, now_ns: int, batch: Batch) -> None:
        """Finalise every wait that has run out and forget finalised keys past their TTL."""
        limit = self._limit
        self._now = max(self._now, now_ns if limit is None else min(now_ns, limit))
        self._expire_front(now_ns, batch)
        while self._done:
            key, packed = next(iter(self._done.items()))
            if (packed >> 2) + self.finalised_ttl_ns > self._now:
                break
            del self._done[key]

    def _expire_front(self, now_ns: int, batch: Batch) -> None:
        """Finalise the waits at the front of the arrival order that have run out."""
        waiting = self._waiting
        while waiting:
            p = next(iter(waiting.values()))
            if p.deadline_ns > self._now:
                break
            self._finalise_alone(p, now_ns, batch, evicted=False)

    def _evict_session(self, sid: str, now_ns: int, batch: Batch) -> None:
        session = self._sessions[sid]
        waiting = sorted([*session.truths.values(), *session.reports.values()], key=lambda p: p.seq)
        for p in waiting:
            self._finalise_alone(p, now_ns, batch, evicted=True)
        self._counts["sessions_evicted"] += 1

    def _finalise_alone(self, p: _Pending, now_ns: int, batch: Batch, *, evicted: bool) -> None:
        """A message whose partner never came: a missed frame or an orphan report."""
        msg = p.message
        key = (msg.session_id, msg.rtp_ts)
        self._unwait(key)
        if evicted:
            self._counts["evicted_over_cap"] += 1
        if isinstance(msg, Truth):
            self._counts["missed"] += 1
            self._remember(key, _TRUTH)
            result = self._missed(msg, p.token, p.consumed_ns, now_ns, evicted=evicted)
        else:
            self._counts["orphans"] += 1
            self._remember(key, _REPORT)
            result = Result(  # no truth: no frame, no truth fields, no mode
                session_id=msg.session_id,
                rtp_ts=msg.rtp_ts,
                status="orphan",
                x=msg.x,
                y=msg.y,
                t_browser_recv_ns=msg.t_browser_recv_ns,
                t_browser_analysed_ns=msg.t_browser_analysed_ns,
                t_router_recv_ns=msg.t_router_recv_ns,
                t_published_ns=msg.t_published_ns,
                t_computed_ns=now_ns,
                tokens=(p.token,),
                t_report_consumed_ns=p.consumed_ns,
                evicted=evicted,
                reason="memory_cap" if evicted else None,
                clock_error_ns=msg.clock_error_ns,
            )
        batch.results.append(result)

    def _check_ends(self, now_ns: int, batch: Batch) -> None:
        """Answer every pending end whose session has no truth waiting any more."""
        for sid in [s for s in self._ends if not self._truths_waiting(s)]:
            end, token = self._ends.pop(sid)
            self._counts["sessions_ended"] += 1
            batch.ended.append(
                Ended(
                    SessionResults(
                        session_id=sid,
                        frames_due=end.frames_due,
                        t_computed_ns=now_ns,
                        reason=end.reason,
                    ),
                    token,
                )
            )

    def _truths_waiting(self, sid: str) -> bool:
        session = self._sessions.get(sid)
        return session is not None and bool(session.truths)

    def _missed(
        self, msg: Truth, token: object, consumed_ns: int, now_ns: int, *, evicted: bool
    ) -> Result:
        reason = "memory_cap" if evicted else "no_report"
        return _alone(msg, token, consumed_ns, now_ns, reason=reason, evicted=evicted)

    def _remember(self, key: Key, kinds: int) -> None:
        self._done[key] = self._now << 2 | kinds
        if len(self._done) > self.max_finalised:
            self._done.popitem(last=False)


def _alone(
    msg: Truth | NotSent,
    token: object,
    consumed_ns: int,
    now_ns: int,
    *,
    reason: str,
    evicted: bool = False,
) -> Result:
    """The row of a frame no report joined: ``missed`` (it was sent) or ``not_sent``."""
    sent = msg if isinstance(msg, Truth) else None
    return Result(
        session_id=msg.session_id,
        rtp_ts=msg.rtp_ts,
        status="missed" if sent is not None else "not_sent",
        frame=msg.frame,
        truth_x=sent.x if sent is not None else None,
        truth_y=sent.y if sent is not None else None,
        t_render_ns=msg.t_render_ns if isinstance(msg, Truth) else msg.t_due_ns,
        t_computed_ns=now_ns,
        tokens=(token,),
        t_truth_consumed_ns=consumed_ns,
        evicted=evicted,
        reason=reason,
        latency=msg.latency,
        phase=msg.phase,
        width=sent.width if sent is not None else None,
        height=sent.height if sent is not None else None,
    )
