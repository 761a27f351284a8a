"""The RTP timestamp origin of a sender, learned from what it sent, and truth stamped with it.

aiortc stamps a frame's packets with ``(origin + pts) mod 2**32``, where ``origin`` is a random
32-bit number drawn inside the sender and never exposed (the track's module docstring tells how
it was read out of aiortc 1.16). What the sender does expose is the timestamp and count of the
last packet it sent. ``OriginLearner`` turns those into the origin, and holds every frame's truth
until its RTP timestamp can be known. It has no clock, no sender and no callback: the track
reports what it handed out and what the sender's two attributes read, and gets back the truth
records that can go out now, each with its RTP timestamp.

Vocabulary:

- *hand out*: ``handed(pts, packets)``, when ``recv()`` returns a frame: its pts and the sender's
  packet count at that moment.
- *observation*: ``observe(packets, rtp_ts)``, on entry to the next ``recv()``. If the packet
  count moved since the hand-out, those packets were that frame's, and ``(rtp_ts - pts) mod
  2**32`` is a candidate origin. If it did not move (sender disabled, encoder gave no payload),
  nothing is inferred and the frame counts as ``unsent``: a frame that was not sent cannot
  corrupt the origin.
- *confirmation*: a candidate becomes the origin once ``confirmations`` consecutive observations
  agree on it. Once known, every observation is checked: equal is an ``agreement``, different a
  ``mismatch`` (a stale timestamp, say), and a different candidate confirmed the same way
  replaces the origin (a ``change``). An agreement resets a half-confirmed candidate.
- *pending truth*: a frame's truth (``add``) goes out at once if the origin is known and nothing
  waits before it; otherwise it waits in a bounded backlog, in order, and the whole backlog goes
  out the moment an origin is confirmed. Overflow drops the oldest (``overflow``); what is still
  waiting at ``abandon()`` is counted as ``abandoned``.

RTP timestamps wrap at 2**32 (after ~13 h at 90 kHz, but the origin is random, so a session's
first frames can wrap too): everything here is modular arithmetic and equality, never an order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["RTP_MOD", "OriginLearner", "PendingTruth", "Stamped"]

#: RTP timestamps are 32-bit.
RTP_MOD: Final = 2**32


@dataclass(frozen=True, slots=True)
class PendingTruth:
    """One frame due: handed to the encoder (``sent``) or skipped as late."""

    frame: int
    "The frame's index on the session's timeline."
    pts: int
    "Its 90 kHz pts: its RTP timestamp is ``(origin + pts) mod 2**32``."
    x: float
    "Where the ball was (0 for a frame not sent)."
    y: float
    t_render_ns: int
    "When it was handed to the encoder; for a frame not sent, when it was due."
    sent: bool = True
    "False for a frame due and skipped (its record is ``NotSent``)."
    phase: int = 0
    "The session's phase (parameters in force) the frame belongs to."
    width: int = 0
    "The frame's geometry (0 for a frame not sent)."
    height: int = 0
    latency: str = "smooth"
    "The playout mode of the frame's phase (``carom.schemas.Latency``)."


@dataclass(frozen=True, slots=True)
class Stamped:
    """A truth record that can go out now, with the RTP timestamp the browser sees for it."""

    truth: PendingTruth
    rtp_ts: int
    "``(origin + truth.pts) mod 2**32``."


class OriginLearner:
    """Learns one sender's RTP timestamp origin and releases truth in frame order once it is known.

    ``confirmations``: consecutive agreeing observations needed to trust (or replace) an origin.
    ``backlog``: how many truth records may wait for the origin (the oldest go first).
    """

    def __init__(self, confirmations: int = 2, backlog: int = 120) -> None:
        if backlog < 1:
            raise ValueError(f"truth_backlog must be >= 1, got {backlog}")
        if confirmations < 1:
            raise ValueError(f"origin_confirmations must be >= 1, got {confirmations}")
        self.confirmations: Final = confirmations
        self.backlog_max: Final = backlog
        self._origin: int | None = None
        self._candidate: int | None = None
        self._candidate_count = 0
        self._prev_pts: int | None = None
        self._packets_at_return = 0
        self._backlog: deque[PendingTruth] = deque()
        #: Observations where the packet count had not moved: frames that produced no packet.
        self.unsent = 0
        #: Observations that gave a candidate, and how they compared with a known origin.
        self.observations = 0
        self.agreements = 0
        self.mismatches = 0
        #: Times a confirmed origin was replaced by another one.
        self.changes = 0
        #: Truth records dropped from a full backlog, and left in it at ``abandon()``.
        self.overflow = 0
        self.abandoned = 0

    @property
    def origin(self) -> int | None:
        """The confirmed origin (RTP ts = (origin + pts) mod 2**32), None until confirmed."""
        return self._origin

    @property
    def pending(self) -> int:
        """Truth records waiting for the origin."""
        return len(self._backlog)

    def handed(self, pts: int, packets: int | None) -> None:
        """A frame with ``pts`` was handed out; ``packets``: the sender's count now (None: none)."""
        self._prev_pts = pts
        if packets is not None:
            self._packets_at_return = packets

    def observe(self, packets: int, rtp_ts: int) -> list[Stamped]:
        """The sender's packet count and last RTP timestamp on entry to the next ``recv()``.

        Returns the backlog, stamped, when this observation confirms an origin; else nothing.
        Before the first hand-out there is no frame to attribute the packets to: ignored.
        """
        if self._prev_pts is None:
            return []
        if packets == self._packets_at_return:
            self.unsent += 1
            return []
        candidate = (rtp_ts - self._prev_pts) % RTP_MOD
        self.observations += 1
        if candidate == self._origin:
            self.agreements += 1
            self._candidate, self._candidate_count = None, 0
            return []
        if self._origin is not None:
            self.mismatches += 1
        if candidate == self._candidate:
            self._candidate_count += 1
        else:
            self._candidate, self._candidate_count = candidate, 1
        if self._candidate_count < self.confirmations:
            return []
        if self._origin is not None:
            self.changes += 1
        self._origin = candidate
        self._candidate, self._candidate_count = None, 0
        out = [self._stamp(t, candidate) for t in self._backlog]
        self._backlog.clear()
        return out

    def add(self, truth: PendingTruth) -> list[Stamped]:
        """A frame's truth: stamped now if the origin is known and nothing waits, else held."""
        if self._origin is not None and not self._backlog:
            return [self._stamp(truth, self._origin)]
        if len(self._backlog) >= self.backlog_max:
            self._backlog.popleft()
            self.overflow += 1
        self._backlog.append(truth)
        return []

    def abandon(self) -> int:
        """The track stops: forget what waits (counted in ``abandoned``); returns how many."""
        n = len(self._backlog)
        self.abandoned += n
        self._backlog.clear()
        return n

    @staticmethod
    def _stamp(truth: PendingTruth, origin: int) -> Stamped:
        return Stamped(truth, (origin + truth.pts) % RTP_MOD)
